"""A user's runs: nothing silently wrong, nothing lost. best.pt and last.pt agree after a kill at
any moment, eval of best.pt gives the summary's number, --max-steps limits one invocation, a
resume keeps its lr schedule, and bad cases end in one clear line (exit 2), not a traceback."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import KILL_RANK_AT, SLOW_CHECKPOINT, SLOW_ONLY, SLOW_TEARDOWN

from masksub.cli import main
from masksub.train import checkpoint
from masksub.train import config as C
from masksub.train.cli_eval import evaluate_checkpoint
from masksub.train.engine import Trainer

LAUNCHER = str(Path(__file__).with_name("fault_launcher.py"))  # masksub with the test patches
# 12 images / batch 4: 3 updates per epoch
TINY = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=12",
        "--set", "synthetic_val_size=8", "--batch-size", "4", "--epochs", "1",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
        "--set", "model_kwargs.num_heads=2", "--amp", "none", "--no-progress", "--set", "log_every=1",
        "--set", "threads=1"]


def train(tmp: Path, name: str, *extra: str) -> int:
    return main(["train", *TINY, *extra, "--output", str(tmp), "--run-name", name])


def records(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [s for s in err.splitlines() if s.startswith("masksub train: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# -- best.pt and last.pt ---------------------------------------------------------------------------
def best_consistent(run: Path) -> None:
    """What last.pt says of the best is on disk: best.pt of that very epoch."""
    last = checkpoint.load(run)
    if last["best_epoch"] > 0:
        assert (run / "best.pt").is_file(), f"last.pt names best epoch {last['best_epoch']}, best.pt is missing"
        assert checkpoint.load(run / "best.pt")["best_epoch"] == last["best_epoch"]


@pytest.mark.slow
def test_kill_9_while_best_is_written_leaves_best_and_last_consistent(tmp_path: Path) -> None:
    assert train(tmp_path, "b", "--set", "epochs=3", "--set", "ema=false", "--max-steps", "1") == 0
    run = tmp_path / "b"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{SLOW_CHECKPOINT: "60", SLOW_ONLY: "best.pt"})
    proc = subprocess.Popen([sys.executable, LAUNCHER, "train", "--resume", str(run), "--set", "max_steps=0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the end of epoch 1: best.pt's write stalls half-way
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if [p for p in run.glob(".best.pt.tmp-*") if p.stat().st_size > 0]:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(run.glob(".best.pt.tmp-*")), "best.pt was never being written"
    best_consistent(run)
    assert main(["train", "--resume", str(run)]) == 0
    best_consistent(run)
    summary = json.loads((run / "summary.json").read_text())
    assert evaluate_checkpoint(str(run / "best.pt"))["top1"] == pytest.approx(summary["best_top1"])


def test_resume_rewrites_a_missing_best(tmp_path: Path) -> None:
    """A run killed (by an older writer) between last.pt and best.pt: the resume writes best.pt
    from last.pt, which holds that very state, before it trains on."""
    assert train(tmp_path, "m", "--set", "epochs=3", "--max-steps", "3") == 0  # stops after epoch 1
    run = tmp_path / "m"
    assert checkpoint.load(run)["best_epoch"] == 1
    (run / "best.pt").unlink()
    t = Trainer(C.from_dict(checkpoint.load(run)["config"]), resume=str(run))
    t.close()
    best_consistent(run)
    last, best = checkpoint.load(run), checkpoint.load(run / "best.pt")
    for k, v in last["model"].items():
        assert torch.equal(v, best["model"][k]), k


def test_eval_of_best_reproduces_the_summary_when_ema_scored(tmp_path: Path, monkeypatch) -> None:
    """The EMA weights score best in epoch 1 (the raw ones are made to lose): best.pt is marked
    with them and evaluates to the summary's number by default; in epoch 2 the raw weights score
    higher than that and replace it."""
    real = Trainer.evaluate
    raw_top1 = {1: -0.5, 2: 1000.0}  # epoch -> the raw weights' score

    def evaluate(self, model=None):
        r = real(self, model)
        return r if model is not None else {**r, "top1": raw_top1[self.epoch + 1]}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    ema = ["--set", "ema=true", "--set", "ema_decay=0.5", "--set", "epochs=2"]
    assert train(tmp_path, "e", *ema, "--max-steps", "3") == 0  # epoch 1 only
    run = tmp_path / "e"
    summary = json.loads((run / "summary.json").read_text())
    ep1 = [r for r in records(run) if r["kind"] == "epoch"][0]
    assert summary["best_weights"] == "ema" and summary["best_top1"] == ep1["ema_top1"]
    got = evaluate_checkpoint(str(run / "best.pt"))
    assert got["top1"] == pytest.approx(summary["best_top1"])
    assert got["val_loss"] == pytest.approx(ep1["ema_val_loss"], rel=1e-5)
    raw = evaluate_checkpoint(str(run / "best.pt"), ema=False)
    assert raw["val_loss"] != pytest.approx(ep1["ema_val_loss"], rel=1e-5)  # the two are told apart
    assert main(["train", "--resume", str(run)]) == 0  # epoch 2: the raw weights win
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["best_epoch"], summary["best_weights"], summary["best_top1"]) == (2, "model", 1000.0)
    best = checkpoint.load(run / "best.pt")
    assert best["best_epoch"] == 2 and best["eval_weights"] == "model"
    assert evaluate_checkpoint(str(run / "best.pt"))["ema"] is False


# -- --max-steps and the number of processes ------------------------------------------------------
def test_max_steps_limits_one_invocation_not_the_run(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "s", "--set", "epochs=2", "--max-steps", "2") == 0
    err = capsys.readouterr().err
    assert "stopped at max_steps=2" in err and "this invocation only" in err
    run = tmp_path / "s"
    assert main(["train", "--resume", str(run)]) == 0  # the command the stop message prints
    ck = checkpoint.load(run)
    assert ck["global_step"] == 6 and ck["epoch"] == 2  # trained to the end, not one more step


def test_resume_with_another_number_of_processes_is_refused(tmp_path: Path, capsys) -> None:
    """A 2-process checkpoint resumed in one process: each rank's 6 images became 12, so the steps
    per epoch (and with them warm-up and cosine) would double; refused, with the way to continue."""
    assert train(tmp_path, "w", "--set", "epochs=2", "--max-steps", "1") == 0
    run = tmp_path / "w"
    ck = checkpoint.load(run)
    ck = {k: v for k, v in ck.items() if k not in ("format", "version")}
    ck.update(world=2, rng=ck["rng"] * 2, acc_ranks=ck["acc_ranks"] * 2)
    checkpoint.save(run / "last.pt", ck)
    before = {n: (run / n).read_bytes() for n in ("last.pt", "metrics.jsonl", "config.yaml")}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "2 process(es)" in line and "torchrun --nproc_per_node 2" in line and "lr" in line
    assert {n: (run / n).read_bytes() for n in before} == before


# -- clear messages -------------------------------------------------------------------------------
def test_accum_steps_beyond_an_epoch_is_refused_and_leaves_no_run(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "a", "--set", "accum_steps=5") == 2
    line = one_line_error(capsys.readouterr().err)
    assert "accum_steps=5" in line and "3 batch" in line
    assert not (tmp_path / "a").exists()
    assert train(tmp_path, "a") == 0  # the rerun is not told "already holds a run"


def test_a_folder_without_checkpoint_is_not_a_run(tmp_path: Path) -> None:
    """What a run stopped before its first checkpoint leaves: a rerun starts it afresh."""
    run = tmp_path / "n"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 1, "loss_main": 9.0}) + "\n")
    assert train(tmp_path, "n", "--max-steps", "2") == 0
    assert [r["step"] for r in records(run)] == [1, 2]
    assert records(run)[0]["loss_main"] != 9.0


def test_full_disk_while_trimming_metrics_on_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    assert train(tmp_path, "t", "--set", "epochs=2", "--max-steps", "2") == 0
    run = tmp_path / "t"
    with (run / "metrics.jsonl").open("a") as f:  # a line logged after the checkpoint (then a kill)
        f.write(json.dumps({"kind": "step", "step": 3, "epoch": 0, "loss_main": 1.0}) + "\n")
    lines = (run / "metrics.jsonl").read_text()
    real = Path.write_text

    def write_text(self, data, *a, **kw):
        if self.name == ".metrics.jsonl.tmp":  # the disk fills half-way through the rewrite
            real(self, data[: len(data) // 2], *a, **kw)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "No space left on device" in line and "metrics.jsonl" in line and f"--resume {run}" in line
    assert not (run / ".metrics.jsonl.tmp").exists()
    assert (run / "metrics.jsonl").read_text() == lines


def test_mixup_with_an_odd_batch_trains(tmp_path: Path) -> None:
    """timm's Mixup mixes pairs (it asserts an even batch): 5 images at batch 8 make one final,
    odd batch (a data set smaller than a batch is kept, not dropped), and it trains."""
    assert train(tmp_path, "x", "--set", "synthetic_size=5", "--batch-size", "8", "--set", "mixup=0.8",
                 "--set", "cutmix=1.0", "--set", "epochs=2") == 0
    assert all(r["loss_main"] == r["loss_main"] for r in records(tmp_path / "x"))


def test_mix_keeps_the_odd_image_and_mixes_the_rest() -> None:
    from timm.data import Mixup

    t = Trainer.__new__(Trainer)
    t.mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.0, num_classes=4)
    x = torch.arange(3, dtype=torch.float32)[:, None].expand(3, 6).clone()
    xm, ym = t._mix(x.clone(), torch.tensor([0, 1, 2]))
    assert torch.equal(xm[2], x[2]) and torch.equal(ym[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert not torch.equal(xm[:2], x[:2]) and ym[0, 0] < 1  # the pair was mixed


def test_read_only_run_directory_on_resume_gives_advice_resume_can_follow(tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    assert train(tmp_path, "r", "--set", "epochs=2", "--max-steps", "1") == 0
    run = (tmp_path / "r").absolute()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == run else real(p, mode, **kw))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "not writable" in line and "--output" not in line and "--run-name" not in line
    assert "--resume" in line


# -- torchrun: one process killed -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("teardown_s", ["0", "20"])
def test_torchrun_rank_killed_survivor_says_what_happened(tmp_path: Path, teardown_s: str) -> None:
    # The launcher stops the survivor (SIGTERM) once it sees rank 1 die; a slow teardown puts
    # that stop after the failure and before the process would end: the message must be out,
    # and a quick teardown must not say it a second time.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1",
               **{KILL_RANK_AT: "1:3", SLOW_TEARDOWN: teardown_s})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", LAUNCHER,
           "train", *TINY, "--set", "synthetic_size=40", "--set", "checkpoint_every=2",
           "--output", str(tmp_path), "--run-name", "k"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    err = res.stderr
    assert res.returncode != 0
    assert err.count("another process of this run ended") == 1, err[-4000:]  # said once, by rank 0
    assert f"{tmp_path / 'k' / 'last.pt'} is intact, from step 2" in err
    assert "torchrun --nproc_per_node 2" in err and f"--resume {tmp_path / 'k'}" in err
    assert "DistBackendError" not in err and "gloo/transport" not in err, err[-4000:]
    assert checkpoint.load(tmp_path / "k")["global_step"] == 2
