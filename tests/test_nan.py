"""Non-finite losses: a bad step is skipped and counted; N in a row stop the run with a
checkpoint and a message naming the step; the model never takes a NaN update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import patch_steps

from masksub.cli import main
from masksub.train import checkpoint

TINY = ["train", "--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=24",
        "--set", "synthetic_val_size=4", "--batch-size", "4", "--epochs", "1",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
        "--set", "model_kwargs.num_heads=2", "--amp", "none", "--no-progress", "--set", "log_every=1",
        "--set", "nonfinite_max=3"]


def finite(run: Path) -> bool:
    return all(torch.isfinite(v).all() for v in checkpoint.load(run)["model"].values() if v.is_floating_point())


def test_one_nan_step_is_skipped_and_counted(tmp_path: Path, monkeypatch, capsys) -> None:
    patch_steps(monkeypatch.setattr, nan_loss=[2])
    assert main([*TINY, "--output", str(tmp_path), "--run-name", "n"]) == 0
    assert "non-finite loss at step 2" in capsys.readouterr().err
    recs = [json.loads(s) for s in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in recs if r["kind"] == "epoch"][0]
    assert epoch["skipped_nonfinite"] == 1 and epoch["train_steps"] == 5
    assert all(r["loss_main"] == r["loss_main"] for r in recs)  # no NaN logged as a loss
    assert finite(tmp_path / "n")


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_nan_in_a_row_stops_with_checkpoint(tmp_path: Path, monkeypatch, capsys, amp: str) -> None:
    patch_steps(monkeypatch.setattr, nan_loss=[2, 3, 4])
    assert main([*TINY, "--amp", amp, "--output", str(tmp_path), "--run-name", "s"]) == 3
    err = capsys.readouterr().err
    assert "not finite for 3 steps in a row (steps 2-4); stopped at step 4" in err
    ck = checkpoint.load(tmp_path / "s")
    assert ck["global_step"] == 5 and ck["nonfinite_total"] == 3
    assert finite(tmp_path / "s")
    # the saved weights are those after step 1 (before the first bad one): rerun 2 steps, compare
    monkeypatch.undo()
    assert main([*TINY, "--amp", amp, "--max-steps", "2", "--output", str(tmp_path), "--run-name", "ref"]) == 0
    ref = checkpoint.load(tmp_path / "ref")["model"]
    for k, v in ck["model"].items():
        assert torch.equal(v, ref[k]), k
