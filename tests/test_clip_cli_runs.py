"""``masksub clip`` runs that stop and continue: exact mid-epoch resume (one and two processes),
uneven shares under torchrun, SIGTERM -> stop after the step with a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("PIL.Image")

from test_clip_train import TINY, write_images  # noqa: E402

from masksub.cli import main  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture()
def cfg(tmp_path):
    p = tmp_path / "masksub-tiny-clip-runs.json"
    p.write_text(json.dumps(TINY))
    return str(p)


def csv_data(tmp_path, n):
    d = tmp_path / "imgs"
    d.mkdir()
    rows = write_images(d, n)
    path = tmp_path / "train.csv"
    path.write_text("filepath,caption\n" + "".join(f"imgs/{a},{b}\n" for a, b in rows))
    return str(path)


def weights(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=True)


def assert_same_weights(a, b):
    assert a["step"] == b["step"]
    diff = {k: float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]}
    assert max(diff.values()) == 0.0, sorted(diff.items(), key=lambda kv: -kv[1])[:3]


def test_resume_mid_epoch_is_bit_exact(tmp_path, cfg):
    """Random crops and the sub-branch's masks continue as if never stopped."""
    data = csv_data(tmp_path, 12)
    base = ["clip", "--data", data, "--model", cfg, "--batch-size", "4", "--warmup", "1", "--device", "cpu",
            "--epochs", "2", "--ratio", "0.5"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--max-steps", "2"]) == 0  # 3 steps an epoch
    assert main(base + ["--out", str(tmp_path / "b"), "--max-steps", "4", "--resume"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_sigterm_stops_after_the_step_and_writes_a_checkpoint(tmp_path, cfg, monkeypatch, capsys):
    from masksub.integrations import clip as clip_mod

    data = csv_data(tmp_path, 12)
    calls = []
    real = clip_mod.ClipMaskSub.backward

    def backward(self, *a, **kw):  # SIGTERM arrives during the second step
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)

    monkeypatch.setattr(clip_mod.ClipMaskSub, "backward", backward)
    base = ["clip", "--data", data, "--model", cfg, "--batch-size", "4", "--warmup", "1", "--device", "cpu",
            "--epochs", "3", "--out", str(tmp_path / "o")]

    def unhandled(signum, frame):  # what would otherwise end the process (and this test run)
        raise RuntimeError("SIGTERM reached the default handler: masksub clip did not handle it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert main(base) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is unhandled  # its own handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "SIGTERM" in capsys.readouterr().err
    ck = weights(tmp_path / "o")
    assert ck["step"] == 2 and len(calls) == 2  # the step in flight was finished, then it stopped
    monkeypatch.setattr(clip_mod.ClipMaskSub, "backward", real)
    assert main(base + ["--resume"]) == 0
    assert main(base[:-2] + ["--out", str(tmp_path / "whole")]) == 0
    assert_same_weights(weights(tmp_path / "o"), weights(tmp_path / "whole"))


def torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "masksub.cli", "clip", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_torchrun_uneven_shares_and_exact_mid_epoch_resume(tmp_path, cfg):
    """11 pairs, batch 4, 2 processes: one rank would get 6 pairs and the other 5, and the
    contrastive all-gather needs equal batches; the tail is dropped, and a stop mid-epoch resumes
    to the same weights."""
    data = csv_data(tmp_path, 11)
    base = ["--data", data, "--model", cfg, "--batch-size", "4", "--warmup", "1", "--device", "cpu",
            "--epochs", "2"]
    res = torchrun(base + ["--out", str(tmp_path / "a")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 4] and all(r["world_size"] == 2 for r in logs)
    res = torchrun(base + ["--out", str(tmp_path / "b"), "--max-steps", "1"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = torchrun(base + ["--out", str(tmp_path / "b"), "--resume"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
