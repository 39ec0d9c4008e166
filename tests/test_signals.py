"""SIGTERM / SIGINT: the current step finishes, a checkpoint is written, the run resumes."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import lines_at_least, signal_when

from masksub.cli import main
from masksub.train import checkpoint

TINY = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=4000",
        "--set", "synthetic_val_size=4", "--batch-size", "4", "--epochs", "1",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
        "--set", "model_kwargs.num_heads=2", "--amp", "none", "--no-progress", "--set", "log_every=1",
        "--set", "threads=1"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_signal_writes_checkpoint_and_resumes(tmp_path: Path, sig: int, code: int) -> None:
    run = tmp_path / "s"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "masksub.cli", "train", *TINY, "--output", str(tmp_path), "--run-name", "s"]
    rc, _out, err = signal_when(cmd, lines_at_least(run / "metrics.jsonl", 3), sig, env=env, timeout=120)
    assert rc == code, err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err
    ck = checkpoint.load(run)
    steps = [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert ck["global_step"] == steps[-1] >= 3 and ck["step_in_epoch"] == ck["global_step"]
    assert json.loads((run / "summary.json").read_text())["stopped"] == "signal"
    assert main(["train", "--resume", str(run), "--set", f"max_steps={ck['global_step'] + 2}"]) == 0
    assert checkpoint.load(run)["global_step"] == ck["global_step"] + 2
