"""``benchmarks/gpu_evidence.sh`` (``benchmarks/gpu_evidence.py``): the project's GPU campaign in
one call, its time guard, goal checks and archive, and its CPU rehearsal (the same stages and
commands on tiny stand-ins)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from masksub.cli import build_parser
from masksub.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    """The campaign is a script under benchmarks/, not a module of the package: load it by path."""
    spec = importlib.util.spec_from_file_location("gpu_evidence", ROOT / "benchmarks" / "gpu_evidence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


ev = _load_script()
DATA = Path("/data/fmnist")  # any path: the commands are only parsed


def _have_fmnist() -> bool:
    return ev.find_data(None) is not None


def _commands(stage: ev.Stage, rehearsal: bool) -> list[list[str]]:
    if stage.kind == "bench":
        return [ev.bench_argv(stage, Path("/r") / stage.name, rehearsal)]
    return [ev.compare_argv(s, seed, Path("/r"), DATA, rehearsal, budget_ratio=1.6) for s, seed in stage.runs()]


# -- the commands cannot fail for a typo: each one parses and builds its plan/config ---------------
@pytest.mark.parametrize("rehearsal", [False, True], ids=["gpu", "rehearsal"])
def test_every_stage_command_parses_and_builds_its_plan(rehearsal: bool) -> None:
    from masksub.bench.cli import grid_plan, parse_batches
    from masksub.bench.steps import MODELS
    from masksub.compare.cli import QUICK, SETTINGS
    from masksub.train import config as C
    from masksub.train.cli_train import overrides

    parser = build_parser()
    plan = ev.make_plan(rehearsal)
    assert [s.name for s in plan] == [s.name for s in ev.make_plan(not rehearsal)]
    for stage in plan:
        for argv in _commands(stage, rehearsal):
            assert argv[1:3] == ["-m", "masksub.cli"]
            args = parser.parse_args(argv[3:])
            assert args.command == stage.kind
            if stage.kind == "bench":
                assert args.models == [stage.model] and stage.model in MODELS
                assert args.device == ("cpu" if rehearsal else "cuda")
                rows = grid_plan(args, args.models)
                assert [(s.variant, s.order) for s in rows] == ev.bench_rows(stage)
                assert all(s.compile is stage.compiled for s in rows)
                parse_batches(args.batch, args.models)
                assert args.compile_backend == ("eager" if rehearsal else "inductor")
            else:
                assert set(args.settings.split(",")) <= set(SETTINGS)
                ov = {**(QUICK if args.quick else {}), **overrides(args)}
                cfg = C.load(args.recipe, ov)  # every --set key and value is checked here
                assert cfg.data_dir == str(DATA) and cfg.tensorboard is False
                if rehearsal:
                    assert cfg.epochs == 1 and cfg.subset == 256
                else:  # the reference recipe as it stands: 30 epochs, bf16, the full data set
                    assert cfg.epochs == 30 and cfg.amp == "bf16" and not cfg.subset
                if "samebudget" in args.settings:
                    assert args.budget_ratio == pytest.approx(1.6)


def test_the_plan_covers_every_goal_model() -> None:
    plan = {s.name: s for s in ev.make_plan()}
    for model in ("vit_b", "vit_s", "vit_l", "resnet50", "swin_t"):
        rows = ev.bench_rows(plan[f"bench-{model}"])
        assert {("standard", None), ("off", None), ("paper", None), ("masksub", "memory")} <= set(rows)
    assert ("masksub", "fused") in ev.bench_rows(plan["bench-vit_b"])
    compiled = [r for s in plan.values() if s.compiled for r in ev.bench_rows(s)]
    assert sorted(compiled, key=str) == sorted([("standard", None), ("masksub", "memory"), ("paper", None),
                                                ("masksub", "fused")], key=str)
    assert plan["compare-core"].runs() == [("baseline", 0), ("baseline", 1), ("masksub", 0), ("masksub", 1)]
    names = list(plan)
    # baseline and masksub come before the optional rows, the eager bench before everything
    assert names.index("compare-core") < names.index("compare-masking") < names.index("compare-samebudget")
    assert all(names.index(f"bench-{m}") < names.index("compare-core")
               for m in ("vit_b", "vit_s", "vit_l", "resnet50", "swin_t"))


def test_the_required_stages_fit_the_default_budget_by_their_estimates() -> None:
    m = ev.Measured()
    plan = ev.make_plan()
    required = [s for s in plan if s.name not in ("bench-vit_b-compiled-2", "compare-masking", "compare-samebudget")]
    total = sum(ev.estimate_s(s, m, rehearsal=False) for s in required)
    assert total <= ev.BUDGET_S - ev.RESERVE_S, total
    assert ev.BUDGET_S + 30 <= 480  # 8 minutes of GPU time, with room for the summary and archive


def test_compare_estimates_follow_what_was_measured() -> None:
    plan = {s.name: s for s in ev.make_plan()}
    m = ev.Measured()
    first = ev.estimate_s(plan["compare-masking"], m, rehearsal=False)
    m.wall.update(baseline=50.0, masksub=90.0)
    m.train_s.update({("baseline", 0): 40.0, ("masksub", 0): 70.0})
    assert m.budget_ratio() == pytest.approx(1.75)
    assert ev.estimate_s(plan["compare-masking"], m, rehearsal=False) == pytest.approx(50.0) != first
    assert ev.estimate_s(plan["compare-samebudget"], m, rehearsal=False) == pytest.approx(50.0 * 1.75)


# -- the time guard -------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_time_guard_with_a_fake_clock() -> None:
    clock = FakeClock()
    g = ev.TimeGuard(100.0, reserve_s=10.0, clock=clock)
    assert g.left() == 90.0 and g.fits(90.0) and not g.fits(90.5)
    clock.t += 50.0
    assert g.elapsed() == 50.0 and g.left() == 40.0 and not g.fits(41.0)
    assert g.deadline() == 1090.0
    with pytest.raises(ev.MaskSubError, match="--budget"):
        ev.TimeGuard(5.0, reserve_s=10.0)


def test_guard_skips_what_does_not_fit_runs_what_does_and_names_the_rerun(tmp_path: Path, monkeypatch) -> None:
    """A stage whose estimate exceeds the time left is skipped, later smaller ones still run, every
    started stage gets the budget's deadline, and the summary names the command for the rest."""
    clock = FakeClock()
    guard = ev.TimeGuard(300.0, reserve_s=10.0, clock=clock)
    plan = ev.make_plan(rehearsal=True)
    est = {"bench-vit_b": 100.0, "bench-vit_s": 250.0, "bench-vit_l": 50.0}
    monkeypatch.setattr(ev, "estimate_s", lambda stage, m, r: est[stage.name])
    calls = []

    def fake_run(commands, deadline, env):
        calls.append((commands[0][0], deadline))
        clock.t += 80.0
        return [0] * len(commands), [80.0] * len(commands)

    monkeypatch.setattr(ev, "run_processes", fake_run)
    stages = [s for s in plan if s.name in est]
    e = ev.Evidence(tmp_path, stages, plan, guard, rehearsal=True, data_dir=None, jobs=4, export=None,
                    log=lambda msg: None)
    summary = e.run()
    status = summary["meta"]["statuses"]
    assert status == {"bench-vit_b": "done", "bench-vit_s": "skipped", "bench-vit_l": "done"}
    assert [c[1] for c in calls] == [1290.0, 1290.0]  # the budget's end, less the reserve
    assert "bench-vit_l" in calls[1][0][calls[1][0].index("--out") + 1]
    by_name = {s["stage"]: s for s in summary["stages"]}
    assert by_name["bench-vit_s"]["status"] == "skipped" and "250" in by_name["bench-vit_s"]["why"]
    assert "bench-vit_s" in summary["left"] and "bench-vit_b" not in summary["left"]
    assert summary["rerun"].startswith("bash benchmarks/gpu_evidence.sh --stages ")
    assert "bench-vit_s" in summary["rerun"].split("--stages ")[1].split(",")
    assert json.loads((tmp_path / "bench-vit_b" / "_stage.json").read_text())["status"] == "done"
    assert "skipped" in (tmp_path / "summary.md").read_text()


def test_a_stage_still_running_at_the_deadline_is_stopped(tmp_path: Path) -> None:
    py = sys.executable
    slow = ([py, "-c", "import time; print('started', flush=True); time.sleep(60)"], tmp_path / "slow.txt")
    fast = ([py, "-c", "print('hello')"], tmp_path / "fast.txt")
    t = time.monotonic()
    codes, walls = ev.run_processes([slow, fast], time.monotonic() + 3.0, dict(os.environ))
    assert codes == [None, 0]
    assert time.monotonic() - t < 30
    assert "hello" in (tmp_path / "fast.txt").read_text()
    assert (tmp_path / "slow.txt").read_text().startswith("$ ")
    failing = ([py, "-c", "raise SystemExit(3)"], tmp_path / "fail.txt")
    assert ev.run_processes([failing], time.monotonic() + 60, dict(os.environ))[0] == [3]


# -- goals ------------------------------------------------------------------------------------------------
def _row(goal_model: str, variant: str, *, order=None, compile=False, ms=10.0, tr=None, mr=None, stage="s",
         peak=None) -> dict:
    return dict(goal_model=goal_model, model=goal_model, stage=stage, variant=variant, mode="mask" if variant in
                ("masksub", "paper") else None, order=order, compile=compile, batch=8, step_ms=ms,
                time_ratio=tr, memory_ratio=mr, peak_bytes=peak, step_flops=100, label=variant)


def test_bench_goals_from_rows() -> None:
    rows = [
        _row("vit_b", "standard", tr=1.0, mr=1.0), _row("vit_b", "masksub", order="memory", tr=1.45, mr=1.01),
        _row("vit_b", "off", tr=1.03),
        _row("vit_s", "masksub", order="memory", tr=1.60, mr=1.0), _row("vit_s", "off", tr=0.99),
        _row("vit_l", "masksub", order="memory", compile=True, tr=1.2),  # compiled: not a goal row
    ]
    goals = ev.check_bench_goals(rows)
    assert len(goals) == 15
    got = {(g["model"], g["goal"].split("(")[-1].rstrip(")")): g for g in goals if g["goal"].startswith("masksub")}
    assert got[("vit_b", "time")]["status"] == "met" and got[("vit_b", "memory")]["status"] == "met"
    assert got[("vit_b", "time")]["measured"] == 1.45
    assert got[("vit_s", "time")]["status"] == "NOT met"
    assert got[("vit_s", "time")]["limit"] == 1.52
    off = {g["model"]: g for g in goals if g["goal"].startswith("sub-branch off")}
    assert off["vit_b"]["status"] == "NOT met" and off["vit_s"]["status"] == "met"
    assert got[("vit_l", "time")]["status"] == "not measured"
    assert got[("swin_t", "time")]["status"] == "not measured" and got[("swin_t", "time")]["limit"] == 1.98


def test_ratios_of_a_stage_without_its_own_standard_row() -> None:
    std = _row("vit_b", "standard", compile=True, ms=40.0, tr=1.0, stage="c1", peak=100)
    paper = _row("vit_b", "paper", compile=True, ms=62.0, stage="c2", peak=103)
    eager = _row("vit_b", "standard", ms=50.0, tr=1.0, stage="e", peak=90)
    ev.fill_ratios([eager, std, paper])
    assert paper["time_ratio"] == pytest.approx(62.0 / 40.0)  # the compiled standard, not the eager one
    assert paper["memory_ratio"] == pytest.approx(1.03) and paper["ratio_to"] == "c1"


def _run(setting: str, seed: int, top1: float, complete: bool = True) -> dict:
    return dict(setting=setting, seed=seed, final_top1=top1, complete=complete)


def test_accuracy_goals_per_seed_from_complete_runs_only() -> None:
    runs = [_run("baseline", 0, 90.0), _run("masksub", 0, 91.6), _run("masking", 0, 89.5),
            _run("baseline", 1, 90.2), _run("masksub", 1, 91.0), _run("masking", 1, 80.0, complete=False)]
    got = {(g["seed"], g["goal"].split()[0]): g for g in ev.check_accuracy_goals(runs)}
    assert got[(0, "masksub")]["status"] == "met" and got[(0, "masksub")]["difference"] == pytest.approx(1.6)
    assert got[(0, "masking-only")]["status"] == "met"
    assert got[(1, "masksub")]["status"] == "NOT met"  # +0.8 < +1.5
    assert got[(1, "masking-only")]["status"] == "not measured"  # cut short: no evidence


# -- results and refusals --------------------------------------------------------------------------------
def test_export_packs_the_results_without_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    (out / "compare-core" / "baseline-seed0" / "baseline-seed0").mkdir(parents=True)
    (out / "compare-core" / "baseline-seed0" / "baseline-seed0" / "last.pt").write_bytes(b"x" * 100)
    (out / "compare-core" / "baseline-seed0" / "baseline-seed0" / "metrics.jsonl").write_text("{}\n")
    (out / "summary.md").write_text("# s\n")
    (out / "summary.json").write_text("{}\n")
    (out / "evidence.log").write_text("log\n")
    files = ev.export(out, tmp_path / "archive")
    assert len(files) == 4  # a few plain files, easy to carry away
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)
    with tarfile.open(tmp_path / "archive" / "gpu-evidence.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu/compare-core/baseline-seed0/baseline-seed0/metrics.jsonl" in names
    assert not any(n.endswith(".pt") for n in names)
    assert (tmp_path / "archive" / "summary.md").read_text() == "# s\n"


def test_refuses_without_cuda_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu"
    assert ev.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--rehearsal" in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--stages", "bench-vit_b,compare-cor"], "compare-cor"),
    (["--rehearsal", "--jobs", "0"], "--jobs"),
    (["--rehearsal", "--stages", "compare-core", "--data-dir", "/nonexistent"], "--stage-data"),
    (["--rehearsal", "--budget", "5"], "--budget"),
])
def test_bad_flags_fail_before_any_work(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu"
    assert ev.main([*flags, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_script_refuses_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_evidence.sh"), "--out", str(tmp_path / "gpu")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "no CUDA device" in res.stderr and "--rehearsal" in res.stderr
    assert not (tmp_path / "gpu").exists()


# -- the CPU rehearsal ---------------------------------------------------------------------------------------
# The GPU call's stages on tiny stand-ins, their commands run in this process (a fresh interpreter
# per stage costs more than the work here; run_processes itself is tested above), in two tests of under a minute of CPU each: eager bench + compare, and the
# compiled bench. bench-vit_s and bench-vit_l run the same tiny ViT with the same rows as
# bench-vit_b; their commands are checked above.
EAGER_AND_COMPARE = ["bench-vit_b", "bench-resnet50", "bench-swin_t", "compare-core", "compare-masking",
                     "compare-samebudget"]
COMPILED = ["bench-vit_b-compiled", "bench-vit_b-compiled-2"]


def run_in_this_process(commands: list[tuple[list[str], Path]], deadline: float, env: dict[str, str]):
    """The script's runner, but each stage's command (the same argv) is given to masksub's CLI in
    this process, one after another, its output in the same log file."""
    codes, walls = [], []
    for argv, log in commands:
        assert argv[1:3] == ["-m", "masksub.cli"], argv
        log.parent.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print("$ " + " ".join(argv), flush=True)
            codes.append(cli_main(argv[3:]))
        walls.append(time.monotonic() - t)
    return codes, walls


def _rehearse(tmp_path: Path, monkeypatch, stages: list[str]) -> tuple[Path, Path, dict]:
    out, export = tmp_path / "gpu", tmp_path / "archive"
    monkeypatch.setattr(ev, "run_processes", run_in_this_process)
    assert ev.main(["--rehearsal", "--archive", str(export), "--out", str(out), "--stages", ",".join(stages)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert all(status[s] == "done" for s in stages), status
    assert all(status[s] == "not run" for s in status if s not in stages)
    assert summary["left"] == [s["stage"] for s in summary["stages"] if s["stage"] not in stages]
    assert summary["meta"]["rehearsal"] is True and "CPU REHEARSAL" in (out / "summary.md").read_text()
    assert not list(out.rglob("*.pt"))
    assert sorted(p.name for p in export.iterdir()) == ["evidence.log", "gpu-evidence.tar.gz", "summary.json",
                                                        "summary.md"]
    return out, export, summary


@pytest.mark.slow
@pytest.mark.skipif(not _have_fmnist(), reason="dataset-fashion-mnist not installed")
def test_cpu_rehearsal_eager_bench_and_compare(tmp_path: Path, monkeypatch) -> None:
    out, _export, summary = _rehearse(tmp_path, monkeypatch, EAGER_AND_COMPARE)
    rows = summary["bench"]
    eager_b = [r["label"] for r in rows if r["goal_model"] == "vit_b"]
    assert len(eager_b) == 8 and "masksub mask fused" in eager_b
    assert {r["goal_model"] for r in rows} == {"vit_b", "resnet50", "swin_t"}
    goals = {(g["model"], g["goal"]): g["status"] for g in summary["bench_goals"]}
    for model in ("vit_b", "resnet50", "swin_t"):
        assert goals[(model, "masksub memory / standard (time)")] in ("met", "NOT met")
        assert goals[(model, "sub-branch off / plain loop (time)")] in ("met", "NOT met")
        assert goals[(model, "masksub memory / standard (memory)")] == "not measured"  # no CUDA peak
    assert goals[("vit_s", "masksub memory / standard (time)")] == "not measured"
    acc = summary["accuracy_goals"]
    assert len(acc) == 4 and all(g["status"] in ("met", "NOT met") for g in acc)
    table = summary["compare"]
    assert [(r["setting"], r["seed"]) for r in table] == [
        (s, seed) for s in ("baseline", "masking", "masksub", "samebudget") for seed in (0, 1)]
    assert all(r["complete"] for r in table)
    cost = sum(r["time_s"] for r in table if r["setting"] == "masksub") / sum(
        r["time_s"] for r in table if r["setting"] == "baseline")
    for r in table:  # the same-budget row: ceil(epochs x MaskSub's measured cost)
        assert r["epochs"] == (max(1, math.ceil(cost - 1e-9)) if r["setting"] == "samebudget" else 1)
    for png in ("accuracy.png", "train_loss_unmasked.png", "train_loss_masked.png", "grad_norm.png"):
        assert (out / "compare" / png).read_bytes()[:4] == b"\x89PNG"
    assert "--stages bench-vit_s,bench-vit_l," in (out / "summary.md").read_text()


@pytest.mark.slow
def test_cpu_rehearsal_compiled_bench(tmp_path: Path, monkeypatch) -> None:
    _out, export, summary = _rehearse(tmp_path, monkeypatch, COMPILED)
    compiled = {r["label"]: r for r in summary["bench"]}
    assert set(compiled) == {"standard", "masksub mask memory", "paper mask two-backward", "masksub mask fused"}
    assert all(r["compile"] and r["goal_model"] == "vit_b" for r in compiled.values())
    assert all(r["time_ratio"] > 0 for r in compiled.values())  # the second compiled stage's too
    assert compiled["paper mask two-backward"]["ratio_to"] == "bench-vit_b-compiled"
    assert all(not r["graphs_in_timed_steps"] for r in compiled.values())  # the warm-up absorbs tracing
    assert compiled["masksub mask memory"]["compiled_sub_differs"] is True
    assert compiled["paper mask two-backward"]["compiled_sub_differs"] is True
    assert all(g["status"] == "not measured" for g in summary["bench_goals"])  # goals are eager rows
    with tarfile.open(export / "gpu-evidence.tar.gz") as tar:
        assert any(n.endswith("bench-vit_b-compiled-2/_stage.json") for n in tar.getnames())


def test_summary_of_a_cut_call(tmp_path: Path) -> None:
    """A bench process stopped mid-write and compare runs stopped early still give a summary: the
    partial run is listed as incomplete and is no evidence for the goals."""
    plan = ev.make_plan()
    (tmp_path / "bench-vit_b").mkdir()
    (tmp_path / "bench-vit_b" / "2026-01-01_H100.json").write_text('{"meta": {}, "rows": [{"mod')
    (tmp_path / "bench-vit_b" / "_stage.json").write_text(json.dumps({"stage": "bench-vit_b", "status": "cut"}))
    for setting, n in (("baseline", 2), ("masksub", 0)):
        run = tmp_path / "compare-core" / f"{setting}-seed0" / f"{setting}-seed0"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("epochs: 30\nseed: 0\n")
        lines = [json.dumps(dict(kind="epoch", epoch=i + 1, top1=80.0 + i, time_s=3.0)) for i in range(n)]
        (run / "metrics.jsonl").write_text("\n".join(lines + ['{"kind": "ep']) + "\n")
    summary = ev.build_summary(tmp_path, plan, rehearsal=False)
    assert summary["bench"] == []
    assert summary["stages"][0]["status"] == "cut" and "bench-vit_b" in summary["left"]
    assert [(r["setting"], r["epochs"], r["complete"]) for r in summary["compare"]] == [("baseline", 2, False)]
    assert all(g["status"] == "not measured" for g in summary["accuracy_goals"])
    assert "| baseline | 0 | 2 | 81.00 |" in ev.summary_markdown(summary)


def test_stage_data_copies_the_files_the_call_finds(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "debian"
    src.mkdir()
    for f in ev.FMNIST_FILES:
        (src / f).write_bytes(b"idx")
    monkeypatch.setattr(ev, "FMNIST_DEBIAN", src)
    dest = ev.stage_data(tmp_path / "repo" / "benchmarks" / "data" / "fashion-mnist")
    assert ev.find_data(str(dest)) == dest.resolve()
    (src / ev.FMNIST_FILES[0]).unlink()
    with pytest.raises(ev.MaskSubError, match="dataset-fashion-mnist"):
        ev.stage_data(tmp_path / "other")
    assert ev.find_data(str(src)) is None
