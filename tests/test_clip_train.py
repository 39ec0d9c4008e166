"""``masksub clip`` on tiny image-text files with a tiny open_clip config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")

from masksub.cli import main  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_images(d, n=8):
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        arr = np.clip(np.array(COLORS[color]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
        names.append((f"img{i}.png", f"a {color} square number {i}"))
    return names


@pytest.fixture()
def cfg(tmp_path):
    p = tmp_path / "masksub-tiny-clip-cli.json"
    p.write_text(json.dumps(TINY))
    return str(p)


def test_clip_cli_folder_pairs_checkpoint_and_resume(tmp_path, cfg):
    data = tmp_path / "pairs"
    data.mkdir()
    for name, caption in write_images(data):
        (data / name).with_suffix(".txt").write_text(caption)
    out = tmp_path / "out"
    base = ["clip", "--data", str(data), "--model", cfg, "--batch-size", "4", "--warmup", "1",
            "--out", str(out), "--device", "cpu"]
    assert main(base + ["--epochs", "1"]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] == 2
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logs] == [1, 2]
    assert logs[-1]["step"] == 4
    assert all(r["loss_sub"] > 0 and r["loss_main"] > 0 for r in logs)
    ck2 = torch.load(out / "checkpoint.pt", weights_only=False)
    moved = any(not torch.equal(ck["state_dict"][k], ck2["state_dict"][k]) for k in ck["state_dict"])
    assert moved


def test_clip_cli_csv_with_validation_retrieval(tmp_path, cfg):
    rows = write_images(tmp_path)
    with open(tmp_path / "train.csv", "w") as f:
        f.write("filepath,title\n" + "".join(f"{a},{b}\n" for a, b in rows))
    out = tmp_path / "out"
    rc = main(["clip", "--data", str(tmp_path / "train.csv"), "--val-data", str(tmp_path / "train.csv"),
               "--model", cfg, "--batch-size", "4", "--sub", "none", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    rec = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "loss_sub" not in rec
    assert 0.0 <= rec["i2t_top1"] <= 1.0 and rec["i2t_top1"] * 8 == pytest.approx(round(rec["i2t_top1"] * 8))


def test_clip_cli_reports_bad_csv(tmp_path, cfg, capsys):
    (tmp_path / "bad.csv").write_text("picture,words\nx.png,hello\n")
    rc = main(["clip", "--data", str(tmp_path / "bad.csv"), "--model", cfg, "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "masksub clip: error:" in err and "caption column" in err


def test_clip_cli_reports_missing_images(tmp_path, cfg, capsys):
    (tmp_path / "d.csv").write_text("filepath,caption\nnope.png,hello\nnope2.png,bye\n")
    assert main(["clip", "--data", str(tmp_path / "d.csv"), "--model", cfg]) == 2
    assert "do not exist" in capsys.readouterr().err


def folder(tmp_path):
    data = tmp_path / "pairs"
    data.mkdir()
    for name, caption in write_images(data):
        (data / name).with_suffix(".txt").write_text(caption)
    return data


def test_clip_cli_resume_mid_epoch_is_exact(tmp_path, cfg):
    """2 epochs of 4 steps straight == stopped at step 2, resumed (the rest of epoch 1 included)."""
    data = folder(tmp_path)
    base = ["clip", "--data", str(data), "--model", cfg, "--batch-size", "2", "--warmup", "1", "--device", "cpu",
            "--epochs", "2"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--max-steps", "2"]) == 0
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert main(base + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8 and b["epoch"] == 2
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=1e-5, atol=1e-6, msg=k)
    logs = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 4, 8]


def test_clip_cli_resume_of_a_partial_single_epoch_trains_the_rest(tmp_path, cfg):
    data = folder(tmp_path)
    base = ["clip", "--data", str(data), "--model", cfg, "--batch-size", "2", "--device", "cpu",
            "--out", str(tmp_path / "o"), "--epochs", "1"]
    assert main(base + ["--max-steps", "1"]) == 0
    assert main(base + ["--resume"]) == 0
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["step"] == 4


def test_clip_cli_checkpoint_loads_as_open_clip_weights(tmp_path, cfg):
    import open_clip

    data = folder(tmp_path)
    out = tmp_path / "o"
    assert main(["clip", "--data", str(data), "--model", cfg, "--batch-size", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    model = open_clip.create_model("masksub-tiny-clip-cli", pretrained=str(out / "checkpoint.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["state_dict"][k]), k
    # and as the trainer's own starting weights
    assert main(["clip", "--data", str(data), "--model", cfg, "--batch-size", "4", "--device", "cpu",
                 "--out", str(tmp_path / "o2"), "--pretrained", str(out / "checkpoint.pt"), "--max-steps", "1"]) == 0


@pytest.mark.slow
def test_clip_cli_under_torchrun_two_processes(tmp_path, cfg):
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = folder(tmp_path)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "masksub.cli",
           "clip", "--data", str(data), "--model", cfg, "--batch-size", "2", "--device", "cpu", "--epochs", "2",
           "--out", str(tmp_path / "o"), "--grad-accum", "2", "--order", "memory"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]  # 8 pairs / 2 ranks / (2 x 2 accumulated): one step an epoch
    assert all(r["world_size"] == 2 and r["loss_sub"] > 0 for r in logs)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_clip_cli_mixed_precision(tmp_path, cfg, precision):
    data = folder(tmp_path)
    rc = main(["clip", "--data", str(data), "--model", cfg, "--batch-size", "4", "--device", "cpu", "--max-steps", "1",
               "--precision", precision, "--out", str(tmp_path / "o")])
    assert rc == 0
    rec = json.loads((tmp_path / "o" / "log.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 1 and rec["loss_sub"] > 0
    ck = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    assert ("scaler" in ck) == (precision == "fp16")
