"""The trainer under hostile use (issue 11): nothing lost, nothing NaN, a message where a
traceback was. Each test names the issue's case; all are tiny synthetic runs (seconds)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import SLOW_CHECKPOINT, patch_steps

from masksub.cli import main
from masksub.train import checkpoint

LAUNCHER = str(Path(__file__).with_name("fault_launcher.py"))  # masksub with the test patches
TINY = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=12",
        "--set", "synthetic_val_size=4", "--batch-size", "4", "--epochs", "1",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
        "--set", "model_kwargs.num_heads=2", "--amp", "none", "--no-progress", "--set", "log_every=1",
        "--set", "nonfinite_max=3", "--set", "threads=1"]


def train(tmp: Path, name: str, *extra: str) -> int:
    return main(["train", *TINY, *extra, "--output", str(tmp), "--run-name", name])


def records(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def all_finite(sd: dict) -> bool:
    return all(torch.isfinite(v).all() for v in sd.values() if torch.is_tensor(v) and v.is_floating_point())


# -- case 1: a non-finite gradient with a finite loss ------------------------------------------
def test_nonfinite_gradient_with_finite_loss_skips_the_step(tmp_path: Path, monkeypatch, capsys) -> None:
    patch_steps(monkeypatch.setattr, nan_grad=[1])
    assert train(tmp_path, "g") == 0
    err = capsys.readouterr().err
    assert "non-finite gradient norm at step 1" in err
    ck = checkpoint.load(tmp_path / "g")
    assert all_finite(ck["model"])
    epoch = [r for r in records(tmp_path / "g") if r["kind"] == "epoch"][0]
    assert epoch["skipped_nonfinite"] == 1 and epoch["train_steps"] == 2


def test_nonfinite_weights_are_never_checkpointed(tmp_path: Path, monkeypatch, capsys) -> None:
    """An update that overflows (test hook: step 2 leaves an inf weight; the loss and gradient were
    finite). The checkpoint due after it is refused; the step-2 one stays, byte for byte."""
    assert train(tmp_path, "w", "--set", "epochs=20", "--max-steps", "2") == 0
    run = tmp_path / "w"
    good = (run / "last.pt").read_bytes()
    patch_steps(monkeypatch.setattr, inf_update=[2])
    capsys.readouterr()
    rc = main(["train", "--resume", str(run), "--set", "checkpoint_every=1", "--set", "max_steps=0"])
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    assert "not finite after step 2" in err and f"{run / 'last.pt'} is intact, from step 2" in err
    assert (run / "last.pt").read_bytes() == good


def test_nonfinite_stop_after_bad_update_keeps_last_finite_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    """The issue's lr=10 run: bad weights, then only non-finite losses; the stop must not save
    them, nor claim "no NaN was applied"."""
    assert train(tmp_path, "s", "--set", "epochs=20", "--set", "synthetic_size=40", "--max-steps", "2") == 0
    run = tmp_path / "s"
    good = (run / "last.pt").read_bytes()
    patch_steps(monkeypatch.setattr, inf_update=[2])
    capsys.readouterr()
    rc = main(["train", "--resume", str(run), "--set", "max_steps=0"])
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    assert "not finite for 3 steps in a row (steps 3-5)" in err
    assert (run / "last.pt").read_bytes() == good
    assert "is intact, from step 2" in err and "no NaN was applied" not in err


# -- case 2: a reused run name ----------------------------------------------------------------
def test_reused_run_name_is_refused_unless_overwrite(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "r", "--max-steps", "2") == 0
    run = tmp_path / "r"
    before = {n: (run / n).read_bytes() for n in ("last.pt", "config.yaml", "metrics.jsonl", "summary.json")}
    capsys.readouterr()
    assert train(tmp_path, "r") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"--resume {run}" in err and "--overwrite" in err
    assert {n: (run / n).read_bytes() for n in before} == before
    assert train(tmp_path, "r", "--overwrite") == 0
    assert [r["epoch"] for r in records(run) if r["kind"] == "epoch"] == [1]
    assert [r["step"] for r in records(run) if r["kind"] == "step"] == [1, 2, 3]


# -- case 3: two processes on one run directory -------------------------------------------------
def test_second_process_on_a_run_is_refused(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "l", "--max-steps", "1", "--set", "epochs=5") == 0
    run = tmp_path / "l"
    lines = (run / "metrics.jsonl").read_text()
    with open(run / ".masksub.lock", "a+") as f:  # another process training in it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--set", "max_steps=2"]) == 2
        assert "another masksub process" in capsys.readouterr().err
        fcntl.flock(f, fcntl.LOCK_UN)
    assert (run / "metrics.jsonl").read_text() == lines
    assert main(["train", "--resume", str(run), "--set", "max_steps=2"]) == 0  # the lock is released
    assert main(["train", "--resume", str(run), "--set", "max_steps=3"]) == 0  # ... also after a run


# -- case 5: non-finite hyperparameters ---------------------------------------------------------
@pytest.mark.parametrize("kv", ["lr=inf", "weight_decay=nan", "clip_grad=inf", "warmup_lr=nan", "mixup=nan"])
def test_nonfinite_hyperparameter_is_refused(tmp_path: Path, capsys, kv: str) -> None:
    assert train(tmp_path, "x", "--set", kv) == 2
    assert "finite" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- case 6: an ImageFolder tree without a validation split ------------------------------------
def _image_tree(root: Path, splits: dict[str, int]) -> None:
    from PIL import Image

    for split, n in splits.items():
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (28, 28), color=40 * i).save(d / f"{i}.png")


def test_imagefolder_without_val_split_is_refused(tmp_path: Path, capsys) -> None:
    from masksub.train import config as C
    from masksub.train.data import build_data

    _image_tree(tmp_path / "d", {"train": 2, "test": 3})
    cfg = C.load("fashion-mnist", {"data": str(tmp_path / "d"), "num_classes": 2, "workers": 0})
    from masksub import MaskSubError

    with pytest.raises(MaskSubError, match="val_split"):
        build_data(cfg, device=torch.device("cpu"))
    cfg.val_split = "test"  # explicit: taken
    train, val = build_data(cfg, device=torch.device("cpu"))
    assert (len(train), len(val)) == (4, 6)  # the test/ images, not the training ones


# -- case 7: eval of a checkpoint with NaN weights -----------------------------------------------
def test_eval_refuses_nonfinite_weights(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "e", "--max-steps", "1") == 0
    ck = checkpoint.load(tmp_path / "e")
    k = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][k].fill_(float("nan"))
    ck = {k2: v for k2, v in ck.items() if k2 not in ("format", "version")}
    checkpoint.save(tmp_path / "nan.pt", ck)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "nan.pt")]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and k in err


# -- case 8: every step non-finite, fewer than nonfinite_max ------------------------------------
def test_run_with_no_finite_step_does_not_exit_0(tmp_path: Path, monkeypatch, capsys) -> None:
    patch_steps(monkeypatch.setattr, nan_loss=[0, 1, 2])
    assert train(tmp_path, "z", "--set", "nonfinite_max=5") == 3
    out = capsys.readouterr()
    assert "loss 0.0000" not in out.err + out.out
    assert "no step of epoch 1 had a finite loss" in out.err
    assert all_finite(checkpoint.load(tmp_path / "z")["model"])


# -- case 9 and 10: what --resume may change ----------------------------------------------------
def test_resume_refuses_keys_that_cannot_change(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "o", "--max-steps", "1", "--set", "epochs=3") == 0
    run = tmp_path / "o"
    cfg_text = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "opt=sgd"]) == 2
    err = capsys.readouterr().err
    assert "opt" in err and "cannot change on --resume" in err
    assert (run / "config.yaml").read_text() == cfg_text
    assert main(["train", "--resume", str(run), "--set", "model_kwargs.depth=2"]) == 2
    assert (run / "config.yaml").read_text() == cfg_text


def test_resume_refuses_another_recipe_and_a_foreign_checkpoint(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "a", "--max-steps", "1", "--set", "epochs=3") == 0
    assert train(tmp_path, "b", "--max-steps", "2", "--set", "epochs=3") == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "a"), "--recipe", "fashion-mnist-quick"]) == 2
    assert "--recipe" in capsys.readouterr().err
    shutil.copy(tmp_path / "b" / "last.pt", tmp_path / "a" / "last.pt")
    assert main(["train", "--resume", str(tmp_path / "a"), "--set", "max_steps=3"]) == 2
    assert "another run" in capsys.readouterr().err


# -- case 11: kill -9 after an epoch line, before its checkpoint -------------------------------
@pytest.mark.slow
def test_kill_9_between_epoch_line_and_checkpoint_does_not_duplicate_lines(tmp_path: Path) -> None:
    base = ["--set", "epochs=2", "--set", "ema=false"]
    assert train(tmp_path, "straight", *base, "--max-steps", "4") == 0
    assert train(tmp_path, "cut", *base, "--max-steps", "2") == 0
    run = tmp_path / "cut"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{SLOW_CHECKPOINT: "60"})
    proc = subprocess.Popen([sys.executable, LAUNCHER, "train", "--resume", str(run),
                             "--set", "max_steps=4"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the checkpoint at the epoch end (step 3) stalls half-way, after its epoch line
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not list(run.glob(".last.pt.tmp-*")):
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(r["kind"] == "epoch" for r in records(run)), "the epoch line was not written before the kill"
    assert checkpoint.load(run)["global_step"] == 2
    assert main(["train", "--resume", str(run), "--set", "max_steps=4"]) == 0

    def strip(recs: list[dict]) -> list[str]:
        return [json.dumps({k: v for k, v in r.items() if k not in ("imgs_per_s", "time_s")}, sort_keys=True)
                for r in recs]

    assert strip(records(run)) == strip(records(tmp_path / "straight"))


# -- case 12: tracebacks where a message belongs ------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["--device", "foo"], "device"),
    (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], "cuda"),
    (["--set", "seed=-1"], "seed"),
    (["--set", "seed=5000000000"], "seed"),
    (["--set", "mean=[0.5, 0.5, 0.5]"], "mean"),
    (["--set", "std=[0.5, 0.5]"], "std"),
    (["--set", "std=[0]"], "std"),
    (["--set", "threads=100000"], "threads"),
], ids=["device-foo", "device-cuda", "seed-neg", "seed-big", "mean-len", "std-len", "std-zero", "threads"])
def test_bad_input_gets_a_message(tmp_path: Path, capsys, argv: list[str], match: str) -> None:
    assert train(tmp_path, "bad", *argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and match in err
    assert not (tmp_path / "bad").exists()


def test_unwritable_output_gets_a_message(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("not a folder")
    rc = main(["train", *TINY, "--output", str(tmp_path / "file" / "runs"), "--run-name", "r"])
    assert rc == 2
    assert "cannot write the run directory" in capsys.readouterr().err


def test_full_disk_while_checkpointing_says_the_previous_one_is_intact(tmp_path: Path, monkeypatch, capsys) -> None:
    assert train(tmp_path, "f", "--max-steps", "1", "--set", "epochs=3") == 0
    run = tmp_path / "f"
    good = (run / "last.pt").read_bytes()
    real_write = checkpoint._write

    def full(f, data):  # the disk fills half-way through the write
        real_write(f, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write", full)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "checkpoint_every=1", "--set", "max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "intact" in err and "step 1" in err
    assert (run / "last.pt").read_bytes() == good
    assert not list(run.glob(".last.pt.tmp-*"))


def test_checkpoint_without_config_gets_a_message(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "c", "--max-steps", "1") == 0
    ck = checkpoint.load(tmp_path / "c")
    ck = {k: v for k, v in ck.items() if k not in ("format", "version", "config")}
    checkpoint.save(tmp_path / "noconf.pt", ck)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "noconf.pt")]) == 2
    assert "no 'config'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "noconf.pt")]) == 2
    assert "no 'config'" in capsys.readouterr().err


# -- case 4: a signal stops the whole comparison; --resume continues it ------------------------
CMP = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=24",
       "--set", "synthetic_val_size=4", "--batch-size", "4", "--epochs", "1", "--set", "model_kwargs.depth=1",
       "--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.num_heads=2", "--amp", "none",
       "--no-progress", "--set", "log_every=1", "--set", "checkpoint_every=1", "--set", "threads=1",
       "--no-analysis", "--settings", "baseline,masksub"]


@pytest.mark.slow
def test_signal_stops_compare_and_resume_finishes_it(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    # every checkpoint write stalls 0.3 s (test hook), so the second run is still going at the signal
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{SLOW_CHECKPOINT: "0.3"})
    proc = subprocess.Popen([sys.executable, LAUNCHER, "compare", *CMP, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    second = out / "masksub-seed0" / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if second.exists() and len(second.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = text.decode()
    assert proc.returncode == 143, text[-3000:]
    assert f"masksub compare --resume {out}" in text
    assert not (out / "results.md").exists() and not (out / "results.csv").exists()
    first = (out / "baseline-seed0" / "metrics.jsonl").read_bytes()
    stopped_at = checkpoint.load(out / "masksub-seed0")["global_step"]
    assert 1 <= stopped_at < 6

    assert main(["compare", "--resume", str(out)]) == 0
    assert (out / "baseline-seed0" / "metrics.jsonl").read_bytes() == first  # finished run kept, not retrained
    import csv

    rows = [r for r in csv.DictReader((out / "results.csv").open()) if r["seed"] != "mean"]
    assert [(r["setting"], r["epochs"], r["complete"]) for r in rows] == [("baseline", "1", "yes"),
                                                                       ("masksub", "1", "yes")]
    steps = [r["step"] for r in records(out / "masksub-seed0") if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed, each step logged once


def test_compare_table_marks_unfinished_runs_and_keeps_them_out_of_the_cost() -> None:
    from masksub.compare.table import rows_from_runs, to_markdown

    ep = [{"top1": 50.0}]
    runs = [{"setting": "baseline", "seed": 0, "epochs": ep, "time_s": 10.0, "complete": True},
            {"setting": "baseline", "seed": 1, "epochs": [], "time_s": 1.0, "complete": False},
            {"setting": "masksub", "seed": 0, "epochs": ep, "time_s": 15.0, "complete": True}]
    rows = rows_from_runs(runs)
    assert [r["complete"] for r in rows] == ["yes", "no", "yes"]
    assert rows[2]["cost_vs_baseline"] == pytest.approx(1.5)  # the partial run's 1 s is not averaged in
    md = to_markdown(rows)
    assert "| baseline | 1 | 0 |" in md and "not comparable" in md
    assert "| baseline | mean | 1 | 50.00 | 50.00 | 10 | 1.00x | yes |" in md


def test_compare_refuses_a_folder_that_holds_a_comparison(tmp_path: Path, capsys) -> None:
    (tmp_path / "compare.json").write_text("{}")
    assert main(["compare", *CMP, "--out", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
