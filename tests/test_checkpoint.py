"""Checkpoints: atomic writes, refusal of damaged / foreign / future files, kill -9 mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import SLOW_CHECKPOINT

from masksub.cli import main
from masksub.errors import MaskSubError
from masksub.train import checkpoint

TINY = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=8",
        "--set", "synthetic_val_size=4", "--batch-size", "4", "--set", "model_kwargs.depth=1",
        "--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.num_heads=2", "--amp", "none",
        "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ck")
    assert main(["train", *TINY, "--epochs", "1", "--output", str(out), "--run-name", "r"]) == 0
    return out / "r"


def test_save_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    p = checkpoint.save(tmp_path / "x.pt", {"a": torch.ones(3)})
    assert checkpoint.load(p)["a"].sum() == 3
    assert [f.name for f in tmp_path.iterdir()] == ["x.pt"]


def test_truncated_checkpoint_is_refused(run: Path, tmp_path: Path) -> None:
    data = (run / "last.pt").read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskSubError, match="truncated"):
        checkpoint.load(bad)
    assert main(["train", "--resume", str(bad)]) == 2


def test_not_a_checkpoint_and_future_version(run: Path, tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(MaskSubError, match="not a masksub checkpoint"):
        checkpoint.load(tmp_path / "plain.pt")
    ck = checkpoint.load(run)
    ck["version"] = checkpoint.VERSION + 1
    torch.save(ck, tmp_path / "future.pt")
    with pytest.raises(MaskSubError, match=f"format version {checkpoint.VERSION + 1}"):
        checkpoint.load(tmp_path / "future.pt")


def test_checkpoint_of_another_model_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    rc = main(["train", "--resume", str(run / "last.pt"), "--set", "model_kwargs.embed_dim=48"])
    assert rc == 2  # refused from the saved config already, before a model is built
    assert "model_kwargs cannot change on --resume" in capsys.readouterr().err
    rc = main(["eval", "--checkpoint", str(run), "--set", "model_kwargs.depth=2"])
    assert rc == 2
    assert "another model" in capsys.readouterr().err


def _wait_for_temp(run: Path, proc: subprocess.Popen, timeout: float = 120) -> list[Path]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        tmp = [p for p in run.glob(".last.pt.tmp-*") if p.stat().st_size > 0]
        if tmp:
            return tmp
        time.sleep(0.1)
    return []


def test_kill_9_during_checkpoint_write_then_resume(tmp_path: Path) -> None:
    """SIGKILL while last.pt is half written: the previous last.pt loads and the run resumes."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    run = tmp_path / "k"
    # a finished checkpoint at step 1
    assert main(["train", *TINY, "--epochs", "50", "--max-steps", "1", "--output", str(tmp_path),
                 "--run-name", "k"]) == 0
    good = (run / "last.pt").read_bytes()
    # resume with checkpoints every step, each write stalled half-way (test hook), and SIGKILL it
    cmd = [sys.executable, str(Path(__file__).with_name("fault_launcher.py")), "train", "--resume", str(run),
           "--set", "max_steps=0", "--set", "checkpoint_every=1", "--set", "threads=1"]
    proc = subprocess.Popen(cmd, env=dict(env, **{SLOW_CHECKPOINT: "60"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tmp = _wait_for_temp(run, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert tmp, "the checkpoint write never started"
    assert proc.returncode == -signal.SIGKILL
    assert tmp[0].stat().st_size < len(good) * 0.75  # it really died half-way
    assert (run / "last.pt").read_bytes() == good  # the previous checkpoint is untouched
    assert checkpoint.load(run)["global_step"] == 1
    # and the run goes on from it
    assert main(["train", "--resume", str(run), "--set", "max_steps=3"]) == 0
    assert checkpoint.load(run)["global_step"] == 3
