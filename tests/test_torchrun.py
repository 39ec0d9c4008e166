"""Two CPU processes under torchrun (gloo): DDP trains, rank 0 alone writes, metrics cover both,
and each process frees its DDP model before it leaves the process group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from masksub.train import checkpoint


def test_torchrun_two_processes(tmp_path: Path) -> None:
    left = tmp_path / "teardown"
    left.mkdir()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", FAULT_TEARDOWN_LOG=str(left))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "fault_launcher.py"), "train", "--recipe", "fashion-mnist", "--data", "synthetic",
           "--set", "synthetic_size=16", "--set", "synthetic_val_size=6", "--batch-size", "4",
           "--epochs", "2", "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
           "--set", "model_kwargs.num_heads=2", "--amp", "none", "--no-progress", "--set", "log_every=1",
           "--analysis", "--set", "grad_norm_every=1", "--set", "threads=1",
           "--output", str(tmp_path), "--run-name", "ddp"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # each rank left its process group with no DDP model alive to free it later, at interpreter exit
    for rank in (0, 1):
        assert json.loads((left / f"rank{rank}.json").read_text()) == {"live_ddp": 0}
    run = tmp_path / "ddp"
    recs = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    steps = [r for r in recs if r["kind"] == "step"]
    assert len(epochs) == 2 and len(steps) == 4  # one writer: no line twice
    for ep in epochs:
        assert ep["world_size"] == 2
        assert ep["val_count"] == 6  # the whole validation set, 3 images on each rank
        assert ep["train_steps"] == 4  # 2 steps x 2 ranks (16 images / 2 ranks / batch 4)
        assert ep["grad_norm_main"] > 0 and ep["train_loss_masked"] > 0
    assert res.stdout.count("masksub train: done") == 1  # rank 0 prints the summary
    ck = checkpoint.load(run)
    assert ck["world"] == 2 and len(ck["rng"]) == 2 and ck["global_step"] == 4
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # per-rank streams kept
