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
    moved = any(not torch.equal(ck["model"][k], ck2["model"][k]) for k in ck["model"])
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
