"""``masksub train --dist fsdp`` on 2 CPU processes (gloo): a run stopped by SIGTERM resumes from
its sharded checkpoint to the same metrics and weights as an uninterrupted run; ``masksub eval``
and the weights export read the sharded checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lines_at_least, signal_when

from masksub.train import checkpoint
from masksub.train.cli_eval import evaluate_checkpoint

# 32 images / 2 ranks / batch 4: 4 steps per epoch, 2 epochs; 7 validation images (4 + 3: the
# ranks run different batch counts at batch 2, which FSDP's collective forwards must survive)
TINY = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=32",
        "--set", "synthetic_val_size=7", "--set", "eval_batch_size=2", "--batch-size", "4", "--epochs", "2",
        "--set", "model_kwargs.depth=2", "--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.num_heads=2",
        "--amp", "none", "--no-progress", "--set", "log_every=1", "--set", "threads=1", "--analysis",
        "--set", "grad_norm_every=1", "--set", "analysis_subset=7", "--dist", "fsdp"]
TIMING = ("imgs_per_s", "time_s")


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "masksub.cli", "train", *args]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")


def lines(run: Path) -> list[dict]:
    out = []
    for s in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(s)
        out.append({k: v for k, v in rec.items() if k not in TIMING})
    return out


@pytest.mark.slow
def test_fsdp_sigterm_resume_equals_uninterrupted(tmp_path: Path) -> None:
    straight = subprocess.run(torchrun(*TINY, "--output", str(tmp_path), "--run-name", "straight"),
                              env=env(), capture_output=True, text=True, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "cut"
    # SIGTERM to the process group, as a scheduler does: torchrun and both workers
    _rc, _out, err = signal_when(torchrun(*TINY, "--output", str(tmp_path), "--run-name", "cut"),
                                 lines_at_least(run / "metrics.jsonl", 2), signal.SIGTERM, env=env(), group=True,
                                 wait_s=300, timeout=300)
    assert "stopped by SIGTERM" in err, err[-3000:]
    ck = checkpoint.load(run)
    assert 2 <= ck["global_step"] < 8, "the signal came too late to interrupt the run"
    assert (run / ck["sharded"] / ".metadata").is_file() and "model" not in ck
    assert list(run.glob(".*.tmp*")) == []  # no temporary directory left
    assert json.loads((run / "summary.json").read_text())["stopped"] == "signal"

    resumed = subprocess.run(torchrun("--resume", str(run)), env=env(), capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = lines(tmp_path / "straight"), lines(run)
    assert len(a) == len(b) == 8 + 2
    assert a == b  # every step and epoch line: losses, accuracy, grad norms, lr
    assert a[-1]["val_count"] == 7 and a[-1]["train_steps"] == 8

    # masksub eval and the weights export read the sharded checkpoints, in one process
    ev_a = evaluate_checkpoint(str(tmp_path / "straight"))
    ev_b = evaluate_checkpoint(str(run), export=str(tmp_path / "w.pt"))
    assert ev_a == {**ev_b, "checkpoint": ev_a["checkpoint"]}
    assert ev_a["count"] == 7 and ev_a["top1"] == pytest.approx(a[-1]["top1"])
    assert ev_a["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-5)
    w = torch.load(tmp_path / "w.pt", weights_only=True)
    ref = {}
    from masksub.train import config as C
    from masksub.train.build import build_model
    from masksub.train.fsdp import load_weights

    model = build_model(C.from_dict(ck["config"]))
    load_weights(checkpoint.load(tmp_path / "straight"), tmp_path / "straight", model)
    ref = model.state_dict()
    assert w.keys() == ref.keys()
    for k in ref:
        assert torch.equal(w[k], ref[k]), k


# -- one process, seconds ------------------------------------------------------------------------
ONE = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=12",
       "--set", "synthetic_val_size=4", "--batch-size", "4", "--epochs", "2",
       "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.num_heads=2",
       "--amp", "none", "--no-progress", "--set", "log_every=1", "--set", "threads=1", "--dist", "fsdp"]


def test_fsdp_checkpoint_one_process_resume_exact_and_crash_leftovers(tmp_path: Path, capsys) -> None:
    """The sharded format in one process (nothing to shard): 2 + 2 steps equal 4 straight, a
    half-written temporary directory and an orphan rename (a writer killed before the pointer)
    are ignored by the resume and cleaned by the next save."""
    from masksub.cli import main

    assert main(["train", *ONE, "--max-steps", "4", "--output", str(tmp_path), "--run-name", "straight"]) == 0
    assert main(["train", *ONE, "--max-steps", "2", "--output", str(tmp_path), "--run-name", "cut"]) == 0
    run = tmp_path / "cut"
    ck = checkpoint.load(run)
    assert ck["sharded"] == "last-000000002.dcp" and "model" not in ck and "optimizer" not in ck
    (run / ".last.dcp.tmp").mkdir()
    (run / ".last.dcp.tmp" / "__0_0.distcp").write_bytes(b"half")
    (run / "last-000000003.dcp").mkdir()  # renamed, but the pointer was never replaced
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 0
    assert lines(run) == lines(tmp_path / "straight")
    assert sorted(p.name for p in run.glob("*.dcp")) == ["best-000000003.dcp", "last-000000004.dcp"]
    assert not (run / ".last.dcp.tmp").exists()
    capsys.readouterr()
    evals = []
    for r in (tmp_path / "straight", run):  # the same weights, read from each run's shards
        assert main(["eval", "--checkpoint", str(r), "--json"]) == 0
        evals.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "checkpoint"})
    assert evals[0] == evals[1] and evals[0]["count"] == 4


def test_fsdp_missing_shards_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from masksub.cli import main

    assert main(["train", *ONE, "--max-steps", "1", "--output", str(tmp_path), "--run-name", "r"]) == 0
    import shutil

    shutil.rmtree(tmp_path / "r" / "last-000000001.dcp")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "r")]) == 2
    assert "missing or incomplete" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "r")]) == 2
    assert "copy the run directory whole" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--amp", "fp16"], "use --amp bf16"),
    (["--set", "ema=true"], "EMA"),
    (["--dist", "fdsp"], "did you mean 'fsdp'"),
])
def test_fsdp_bad_combinations_fail_before_work(tmp_path: Path, capsys, argv: list[str], match: str) -> None:
    from masksub.cli import main

    rc = main(["train", *ONE, *argv, "--output", str(tmp_path), "--run-name", "bad"])
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert not (tmp_path / "bad").exists()
