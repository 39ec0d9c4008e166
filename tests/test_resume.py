"""``--resume`` continues exactly: 2 + 2 steps give the weights of 4 steps straight, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from masksub.cli import main
from masksub.train import checkpoint

# 12 images / batch 4 = 3 steps per epoch: step 4 crosses an epoch end (eval, checkpoint).
BASE = ["train", "--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=12",
        "--set", "synthetic_val_size=4", "--batch-size", "4", "--epochs", "2",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
        "--set", "model_kwargs.num_heads=2", "--amp", "none", "--no-progress",
        "--set", "ema=true", "--set", "ema_decay=0.9", "--set", "drop_path=0.1",
        "--set", "mixup=0.5", "--set", "cutmix=0.5", "--set", "label_smoothing=0.1",
        "--set", "log_every=1"]


def same_state(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"optimizer {i}.{k}"
    assert a["global_step"] == b["global_step"] == 4
    assert a["rng"][0]["torch"].equal(b["rng"][0]["torch"])


@pytest.mark.parametrize("sub", ["mask", "droppath"])
def test_resume_is_bit_identical(tmp_path: Path, sub: str) -> None:
    assert main([*BASE, "--sub", sub, "--max-steps", "4", "--output", str(tmp_path), "--run-name", "straight"]) == 0
    assert main([*BASE, "--sub", sub, "--max-steps", "2", "--output", str(tmp_path), "--run-name", "cut"]) == 0
    half = checkpoint.load(tmp_path / "cut")
    assert half["global_step"] == 2 and half["step_in_epoch"] == 2
    assert main(["train", "--resume", str(tmp_path / "cut"), "--max-steps", "4"]) == 0
    same_state(checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "cut"))
    # the logged history is the same too (the epoch line after the cut included)
    def metrics(run: str) -> list[str]:
        import json

        out = []
        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            r.pop("imgs_per_s", None)
            r.pop("time_s", None)
            out.append(json.dumps(r, sort_keys=True))
        return out

    assert metrics("straight") == metrics("cut")
