"""The GPU evidence in one call (``bash benchmarks/gpu_evidence.sh``): this project's own campaign.

The two results the project exists to show (a MaskSub step's cost beside a standard one, and
MaskSub's accuracy gain on the Fashion-MNIST recipe) are measured by one command that cannot fail
for a typo and that keeps what finished when GPU time runs out:

- the work is a fixed list of *stages* (``masksub bench`` per model, ``masksub compare`` per
  group of settings), most valuable first, each a command in its own process and its own folder;
- a wall-clock budget (``--budget``) guards it: a stage starts only when its estimate fits the
  time left, and one still running at the budget's end is stopped, so the call ends in time;
- after every stage the summary (every target checked from the JSON on disk) is rewritten and,
  with ``--archive DIR``, the results are packed there, so a call cut short keeps what finished;
- ``--rehearsal`` runs the same stages on CPU with tiny stand-ins and one epoch (the test suite
  does this), so the GPU call runs code that has already run.

The stages run ``python -m masksub.cli bench|compare`` as commands; this script imports only the
package's error type, the compare table/plot helpers (to merge the runs) and, on use, torch (the
CUDA check). It lives outside the package: a user runs ``masksub bench`` and ``masksub compare``
directly; this is how the project produces its evidence with them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from masksub.errors import MaskSubError

# Default budget: the whole campaign's most valuable stages in under 8 minutes of GPU time; stages
# stop at 450 s and the last summary and archive take a few seconds, so an outer limit of 480 s
# leaves the call time to finish cleanly.
BUDGET_S = 450.0
RESERVE_S = 10.0  # kept back at the end for the summary and the archive
DEFAULT_OUT = Path("benchmarks/results/gpu")
REHEARSAL_OUT = Path("runs/gpu-evidence-rehearsal")
DATA_STAGED = Path("benchmarks/data/fashion-mnist")  # where --stage-data copies the IDX files
FMNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
RECIPE = "fashion-mnist"

# Fashion-MNIST reference (benchmarks/README.md, "Reference figures") and the accuracy targets.
ACCURACY_GAIN = 1.5  # MaskSub >= standard + 1.5 points, each seed
REFERENCE_TOP1 = {"baseline": (90.33, 90.13), "masking": (89.93, 89.84), "masksub": (92.20, 92.13)}

# -- step-time estimates (for the budget only; never reported as measurements) ----------------
# Eager bf16 standard steps on an H100/H200, in ms, at the bench's batches. The H200
# reference gives the compiled ViT-B/16 (batch 128) standard step, 38.8 ms; eager is taken ~15%
# slower (45 ms). The others are scaled by forward GMACs per image (the figures timm's model
# cards list, quoted from memory: estimate inputs only) x batch against ViT-B/16 (17.6 x 128):
# ViT-S 4.6 x 256 (0.52x; small widths run less efficiently: 30 ms), ViT-L 61.6 x 64 (1.75x:
# 80 ms), ResNet-50 4.1 x 128 and Swin-T 4.5 x 128 (0.23x-0.26x, but many small memory-bound
# kernels in eager: 40 ms each, on the safe side).
STEP_MS = {"vit_s": 30.0, "vit_b": 45.0, "vit_l": 80.0, "resnet50": 40.0, "swin_t": 40.0}
# MaskSub / standard step time, the reference table in benchmarks/README.md (paper recipe, H200); Swin-T as
# ResNet-50 (a full-size sub forward, FLOP limit 2.0).
MASKSUB_RATIO = {"vit_s": 1.583, "vit_b": 1.543, "vit_l": 1.528, "resnet50": 1.953, "swin_t": 1.953}
# Model build on the host (timm init of random weights), s.
BUILD_S = {"vit_s": 2.0, "vit_b": 3.0, "vit_l": 8.0, "resnet50": 2.0, "swin_t": 2.0}
STAGE_START_S = 10.0  # a process: python, torch, timm, CUDA context
ROW_OVERHEAD_S = 1.5  # per row: model copy to the GPU, FLOP counting, gc, empty_cache
EXTRA_STEPS = 4       # per row beyond warm-up + timed: host-sync count, FLOP count, 2 forwards
# torch.compile (inductor) per new graph shape, s: a cold ViT-B/16 forward+backward. A row whose
# graphs an earlier row of the same process compiled hits inductor's cache.
COMPILE_S = 45.0
GPU_STEPS, GPU_WARMUP = 15, 3           # eager rows: median of 15 CUDA-event timed steps
GPU_STEPS_COMPILED, GPU_WARMUP_COMPILED = 15, 5
# Fashion-MNIST recipe (30 epochs, batch 512, 117 steps/epoch), seconds per epoch with every
# run of a stage sharing one GPU: no reference time exists; the model (49 tokens, width 192,
# depth 6) is bound by kernel launches (~10 ms/step alone, MaskSub ~2x), taken as 2x that for
# sharing, evaluation and the analysis passes. Once the first compare stage ran, later compare
# stages are estimated from its measured times instead.
EPOCH_S = {"baseline": 2.5, "masking": 2.5, "masksub": 5.0, "samebudget": 2.5}
COMPARE_START_S = 15.0

# -- the goals ----------------------------------------------------------------------------------
# Cost goals, (model, what, limit), checked on eager rows. "time": the MaskSub memory-order step
# over the standard step. The paper claims about x1.5 the computation of standard training for ViT
# at 50% masking (masked tokens removed) and x2 for CNNs and Swin (the sub forward keeps its size):
# ViT-B and ViT-L at most 1.50, ViT-S (a small width runs less efficiently) 1.52, ResNet-50 and
# Swin-T 1.98. "memory": the same row's peak over the standard step's (the paper: no extra memory,
# the main branch's activations are freed before the sub forward), 2% slack. "off": the masksub
# step with its sub-branch off over the plain loop (masksub's own overhead), 2% slack.
GPU_MODELS = ("vit_s", "vit_b", "vit_l", "resnet50", "swin_t")
GOALS: list[tuple[str, str, float]] = [
    ("vit_b", "time", 1.50), ("vit_s", "time", 1.52), ("vit_l", "time", 1.50),
    ("resnet50", "time", 1.98), ("swin_t", "time", 1.98),
    *[(m, "memory", 1.02) for m in GPU_MODELS],
    *[(m, "off", 1.02) for m in GPU_MODELS],
]

# -- the plan -----------------------------------------------------------------------------------
BENCH_ROWS = ("standard", "off", "paper", "masksub", "part_main", "part_sub", "part_opt")
STAND_INS = {"vit_s": "tiny_vit", "vit_b": "tiny_vit", "vit_l": "tiny_vit",
             "resnet50": "tiny_resnet", "swin_t": "tiny_swin"}
# Rehearsal: compare on a CPU-sized Fashion-MNIST (a subset, one epoch, a one-block model).
REHEARSAL_COMPARE = ["--quick", "--epochs", "1", "--set", "subset=256", "--set", "val_subset=128",
                     "--set", "batch_size=64", "--set", "model_kwargs.depth=1",
                     "--set", "model_kwargs.embed_dim=48", "--set", "analysis_subset=64",
                     "--set", "threads=1"]
# Rehearsal: CPU bench rows of one step; compiled rows trace with dynamo's eager backend (no code
# generation) and get one warm-up step, as the GPU's warm-up absorbs compilation.
REHEARSAL_BENCH = ["--device", "cpu", "--dtype", "fp32", "--batch", "2", "--steps", "1", "--compile-backend", "eager"]


@dataclass(frozen=True)
class Stage:
    """One unit of work: one process (bench) or several side by side (compare, one per run)."""

    name: str
    kind: str                                  # "bench" or "compare"
    what: str
    model: str = ""                            # bench: the model benched (a stand-in in rehearsal)
    goal_model: str = ""                       # bench: the GPU model its rows stand for
    variants: tuple[str, ...] = ()
    orders: tuple[str, ...] = ("memory",)
    compiled: bool = False
    cached: tuple[str, ...] = ()               # bench: graph shapes an earlier stage compiled (inductor's
                                               # on-disk cache makes them cheap here)
    settings: tuple[str, ...] = ()             # compare: one process per (setting, seed)
    seeds: tuple[int, ...] = ()

    def runs(self) -> list[tuple[str, int]]:
        return [(s, seed) for s in self.settings for seed in self.seeds]


def make_plan(rehearsal: bool = False) -> list[Stage]:
    """The stages in priority order: eager bench (the cost goals), then baseline and MaskSub
    (the accuracy goal), then compiled ViT-B, then masking-only and the same-budget row."""
    def m(name: str) -> str:
        return STAND_INS[name] if rehearsal else name

    plan = [Stage("bench-vit_b", "bench", "ViT-B/16 eager: standard, off, paper, masksub memory+fused, parts",
                  m("vit_b"), "vit_b", BENCH_ROWS, ("memory", "fused"))]
    # The ViT goals (1.50-1.52x) are below the reference ratios (benchmarks/README.md) (1.53-1.58x): their
    # breakdown (the parts) says where the time goes if they are missed. ResNet-50 and Swin-T
    # (goal 1.98x, reference 1.95x) get the rows of their goals only, to fit the budget.
    for name, title in (("vit_s", "ViT-S/16"), ("vit_l", "ViT-L/16")):
        plan.append(Stage(f"bench-{name}", "bench", f"{title} eager: standard, off, paper, masksub memory, parts",
                          m(name), name, BENCH_ROWS, ("memory",)))
    for name, title in (("resnet50", "ResNet-50"), ("swin_t", "Swin-T")):
        plan.append(Stage(f"bench-{name}", "bench", f"{title} eager: standard, off, paper, masksub memory",
                          m(name), name, BENCH_ROWS[:4], ("memory",)))
    plan.append(Stage("compare-core", "compare", "Fashion-MNIST recipe: baseline and masksub, seeds 0, 1",
                      settings=("baseline", "masksub"), seeds=(0, 1)))
    plan.append(Stage("bench-vit_b-compiled", "bench", "ViT-B/16 compiled: standard, masksub memory",
                      m("vit_b"), "vit_b", ("standard", "masksub"), ("memory",), compiled=True))
    plan.append(Stage("bench-vit_b-compiled-2", "bench", "ViT-B/16 compiled: paper recipe, masksub fused",
                      m("vit_b"), "vit_b", ("paper", "masksub"), ("fused",), compiled=True,
                      cached=("main", "sub")))
    plan.append(Stage("compare-masking", "compare", "Fashion-MNIST: masking-only (Eq. 2), seeds 0, 1",
                      settings=("masking",), seeds=(0, 1)))
    plan.append(Stage("compare-samebudget", "compare", "Fashion-MNIST: standard at MaskSub's measured cost, seeds 0, 1",
                      settings=("samebudget",), seeds=(0, 1)))
    return plan


def select(plan: list[Stage], names: str | None) -> list[Stage]:
    """``--stages a,b``: those stages in plan order; an unknown name is an error before any work."""
    if not names:
        return plan
    want = [n.strip() for n in names.split(",") if n.strip()]
    known = [s.name for s in plan]
    bad = [n for n in want if n not in known]
    if bad or not want:
        raise MaskSubError(f"--stages: unknown {bad or names!r}; pick from {', '.join(known)}")
    return [s for s in plan if s.name in want]


# -- commands -------------------------------------------------------------------------------------
def bench_argv(stage: Stage, out: Path, rehearsal: bool, python: str = sys.executable) -> list[str]:
    modes = "mask"
    argv = [python, "-m", "masksub.cli", "bench", "--models", stage.model, "--variants", ",".join(stage.variants),
            "--modes", modes, "--orders", ",".join(stage.orders), "--compile", "on" if stage.compiled else "off",
            "--out", str(out)]
    if rehearsal:
        return argv + REHEARSAL_BENCH + ["--warmup", "1" if stage.compiled else "0"]
    steps, warmup = (GPU_STEPS_COMPILED, GPU_WARMUP_COMPILED) if stage.compiled else (GPU_STEPS, GPU_WARMUP)
    return argv + ["--device", "cuda", "--steps", str(steps), "--warmup", str(warmup)]


def compare_argv(setting: str, seed: int, out: Path, data_dir: Path, rehearsal: bool,
                 budget_ratio: float | None = None, python: str = sys.executable) -> list[str]:
    argv = [python, "-m", "masksub.cli", "compare", "--recipe", RECIPE, "--settings", setting,
            "--seeds", str(seed), "--out", str(out), "--no-progress",
            "--set", f"data_dir={data_dir}", "--set", "tensorboard=false"]
    if setting == "samebudget":
        if budget_ratio is None:
            raise MaskSubError("samebudget needs MaskSub's measured cost (run compare-core first)")
        argv += ["--budget-ratio", f"{budget_ratio:.4f}"]
    return argv + (REHEARSAL_COMPARE if rehearsal else [])


# -- estimates ------------------------------------------------------------------------------------
def _variant_factor(model: str, variant: str) -> float:
    r = MASKSUB_RATIO[model]
    return {"standard": 1.0, "off": 1.0, "paper": r, "masksub": r, "part_main": 0.9,
            "part_sub": r - 1.0, "part_opt": 0.1}[variant]


def bench_rows(stage: Stage) -> list[tuple[str, str | None]]:
    """(variant, order) of each row the stage's bench command makes (as bench's grid plan)."""
    rows: list[tuple[str, str | None]] = []
    for v in stage.variants:
        rows += [(v, o) for o in stage.orders] if v == "masksub" else [(v, None)]
    return rows


def estimate_bench_s(stage: Stage) -> float:
    """Wall seconds of a GPU bench stage from the reference step times above."""
    model = stage.goal_model
    steps = (GPU_STEPS_COMPILED + GPU_WARMUP_COMPILED) if stage.compiled else (GPU_STEPS + GPU_WARMUP)
    total = STAGE_START_S + BUILD_S[model]
    shapes_done: set[str] = set(stage.cached)
    for variant, _order in bench_rows(stage):
        ms = STEP_MS[model] * _variant_factor(model, variant) * (0.8 if stage.compiled else 1.0)
        total += ROW_OVERHEAD_S + (steps + EXTRA_STEPS) * ms / 1e3
        if stage.compiled:
            # graph shapes: the plain model at full size; the sub at half; the paper wrapper's own
            shapes = {"standard": {"main"}, "masksub": {"main", "sub"}, "paper": {"paper-main", "paper-sub"}}[variant]
            total += COMPILE_S * len(shapes - shapes_done) + 5.0
            shapes_done |= shapes
    return total


@dataclass
class Measured:
    """What earlier compare stages of this call measured: wall seconds per setting (the slowest
    of its processes) and training seconds per (setting, seed)."""

    wall: dict[str, float] = field(default_factory=dict)
    train_s: dict[tuple[str, int], float] = field(default_factory=dict)

    def budget_ratio(self) -> float | None:
        """MaskSub's cost over the baseline's (mean training time), as compare measures it."""
        def mean(setting: str) -> float | None:
            ts = [t for (s, _), t in self.train_s.items() if s == setting and t]
            return sum(ts) / len(ts) if ts else None

        b, m = mean("baseline"), mean("masksub")
        return m / b if b and m else None


def estimate_compare_s(stage: Stage, measured: Measured, epochs: int = 30) -> float:
    """Wall seconds of a compare stage (its runs side by side): measured walls when an earlier
    stage ran the same kind of training, else the per-epoch figures above."""
    est = []
    for setting, _seed in stage.runs():
        if setting in measured.wall:
            est.append(measured.wall[setting])
        elif setting in ("masking", "samebudget") and "baseline" in measured.wall:
            scale = (measured.budget_ratio() or 2.0) if setting == "samebudget" else 1.0
            est.append(measured.wall["baseline"] * scale)  # one branch, launch-bound like the baseline
        else:
            scale = 2.0 if setting == "samebudget" else 1.0
            est.append(COMPARE_START_S + epochs * scale * EPOCH_S[setting])
    return max(est) if est else 0.0


def estimate_s(stage: Stage, measured: Measured, rehearsal: bool) -> float:
    if rehearsal:  # CPU, tiny stand-ins: only the start-up and a few small steps
        return 20.0 if stage.kind == "bench" else 40.0
    return estimate_bench_s(stage) if stage.kind == "bench" else estimate_compare_s(stage, measured)


# -- the time guard ---------------------------------------------------------------------------------
class TimeGuard:
    """The wall-clock budget of the whole call: start a stage only if its estimate fits, and
    give each started one a deadline at the budget's end (less the reserve for the summary)."""

    def __init__(self, budget_s: float, reserve_s: float = RESERVE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if budget_s <= reserve_s:
            raise MaskSubError(f"--budget must be above {reserve_s:.0f} s, got {budget_s:g}")
        self.budget_s, self.reserve_s, self.clock = budget_s, reserve_s, clock
        self.t0 = clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        """Seconds left for stages (the reserve excluded)."""
        return self.budget_s - self.reserve_s - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    def deadline(self) -> float:
        """The clock() value at which a running stage is stopped."""
        return self.t0 + self.budget_s - self.reserve_s


# -- running --------------------------------------------------------------------------------------
def _stop(proc: subprocess.Popen) -> None:
    """Stop a stage's process group (the process and anything it started)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_processes(commands: list[tuple[list[str], Path]], deadline: float, env: dict[str, str],
                  clock: Callable[[], float] = time.monotonic) -> tuple[list[int | None], list[float]]:
    """Run commands side by side, each writing its output to its log file; stop every one still
    running at ``deadline``. Returns exit codes (None = stopped) and wall seconds."""
    procs, logs, starts = [], [], []
    try:
        for argv, log in commands:
            log.parent.mkdir(parents=True, exist_ok=True)
            f = log.open("w")
            logs.append(f)
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            starts.append(clock())
            procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
        codes: list[int | None] = [None] * len(procs)
        walls = [0.0] * len(procs)
        while any(c is None and p.poll() is None for c, p in zip(codes, procs, strict=True)):
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i], walls[i] = p.returncode, clock() - starts[i]
            if clock() >= deadline:
                break
            time.sleep(0.2)
        for i, p in enumerate(procs):
            if codes[i] is None:
                if p.poll() is None:
                    _stop(p)
                    walls[i] = clock() - starts[i]
                    continue  # stopped: code stays None
                codes[i], walls[i] = p.returncode, clock() - starts[i]
        return codes, walls
    finally:
        for p in procs:
            if p.poll() is None:
                _stop(p)
        for f in logs:
            f.close()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Evidence:
    """One call: the selected stages under the guard, the summary after each."""

    def __init__(self, out: Path, stages: list[Stage], plan: list[Stage], guard: TimeGuard, *,
                 rehearsal: bool, data_dir: Path | None, jobs: int, export: Path | None,
                 log: Callable[[str], None], python: str = sys.executable) -> None:
        self.out, self.stages, self.plan, self.guard = out, stages, plan, guard
        self.rehearsal, self.data_dir, self.jobs, self.export = rehearsal, data_dir, jobs, export
        self.log, self.python = log, python
        self.measured = Measured()
        self.skipped: dict[str, str] = {}
        self.meta: dict[str, Any] = {}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def commands(self, stage: Stage) -> list[tuple[list[str], Path]]:
        d = self.out / stage.name
        if stage.kind == "bench":
            return [(bench_argv(stage, d, self.rehearsal, self.python), d / "log.txt")]
        assert self.data_dir is not None
        ratio = self.measured.budget_ratio() if "samebudget" in stage.settings else None
        if "samebudget" in stage.settings and ratio is None:
            ratio = _ratio_from_disk(self.out)
        return [(compare_argv(s, seed, d / f"{s}-seed{seed}", self.data_dir, self.rehearsal, ratio, self.python),
                 d / f"log-{s}-seed{seed}.txt") for s, seed in stage.runs()]

    def run_stage(self, stage: Stage) -> str:
        est = estimate_s(stage, self.measured, self.rehearsal)
        if not self.guard.fits(est):
            why = f"estimated {est:.0f} s, {max(self.guard.left(), 0):.0f} s left"
            self.skipped[stage.name] = why
            self.log(f"[{self.guard.elapsed():5.0f} s] skip {stage.name}: {why}")
            return "skipped"
        try:
            cmds = self.commands(stage)
        except MaskSubError as e:
            self.skipped[stage.name] = str(e)
            self.log(f"[{self.guard.elapsed():5.0f} s] skip {stage.name}: {e}")
            return "skipped"
        d = self.out / stage.name
        if d.exists():
            shutil.rmtree(d)  # this stage's earlier results would mix with the new ones
        d.mkdir(parents=True)
        started, t_stage = _now(), time.monotonic()
        self.log(f"[{self.guard.elapsed():5.0f} s] start {stage.name} (est. {est:.0f} s): {stage.what}")
        _write_json(d / "_stage.json", dict(stage=stage.name, status="running", started=started, estimate_s=est))
        env = self.env()
        if stage.kind == "compare":  # runs side by side: split the host threads between them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // max(1, len(cmds))))
        codes: list[int | None] = []
        walls: list[float] = []
        for i in range(0, len(cmds), self.jobs):
            part = cmds[i:i + self.jobs]
            c, w = run_processes(part, self.guard.deadline(), env)
            codes += c
            walls += w
            if any(x is None for x in c):
                codes += [None] * (len(cmds) - len(codes))
                walls += [0.0] * (len(cmds) - len(walls))
                break
        status = ("cut" if any(c is None for c in codes) else "failed" if any(codes) else "done")
        for p in d.rglob("*.pt"):  # checkpoints stay out of the results
            p.unlink()
        if stage.kind == "compare":
            for (s, seed), w in zip(stage.runs(), walls, strict=True):
                self.measured.wall[s] = max(self.measured.wall.get(s, 0.0), w)
                t = _train_s(d / f"{s}-seed{seed}" / f"{s}-seed{seed}")
                if t:
                    self.measured.train_s[(s, seed)] = t
        _write_json(d / "_stage.json", dict(stage=stage.name, status=status, started=started, finished=_now(),
                                            wall_s=round(time.monotonic() - t_stage, 1), estimate_s=round(est, 1),
                                            exit_codes=codes, commands=[c for c, _ in cmds]))
        self.log(f"[{self.guard.elapsed():5.0f} s] {status} {stage.name} in {time.monotonic() - t_stage:.0f} s")
        if status != "done":
            for _argv, logf in cmds:
                self.log(f"--- tail of {logf}:\n{_tail(logf)}")
        return status

    def run(self) -> dict[str, Any]:
        statuses: dict[str, str] = {}
        for stage in self.stages:
            statuses[stage.name] = self.run_stage(stage)
            if statuses[stage.name] != "skipped":
                self.finish(plots=stage.kind == "compare")  # the plots change with compare runs only
        self.meta["statuses"] = statuses
        return self.finish(plots=False)

    def finish(self, plots: bool = True) -> dict[str, Any]:
        """Summary from what is on disk, written next to the results and exported. A failure
        here is logged, never fatal: the next stages and the archive matter more."""
        self.meta.update(elapsed_s=round(self.guard.elapsed(), 1))
        summary: dict[str, Any] = {"meta": dict(self.meta)}
        try:
            summary = build_summary(self.out, self.plan, rehearsal=self.rehearsal, skipped=self.skipped,
                                    meta=self.meta, plots=plots)
            write_summary(self.out, summary)
        except Exception as e:  # noqa: BLE001 - keep measuring; the error is in the log and the archive
            self.log(f"summary failed: {type(e).__name__}: {e}")
        if self.export is not None:
            try:
                export(self.out, self.export)
            except OSError as e:
                self.log(f"export to {self.export} failed: {e}")
        return summary


def _train_s(run_dir: Path) -> float | None:
    """Training seconds of a run (its epoch lines), as compare counts them."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    total = 0.0
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "epoch":
            total += rec.get("time_s") or 0.0
    return total or None


def _ratio_from_disk(out: Path) -> float | None:
    """MaskSub's measured cost from compare-core runs already on disk (a rerun of later stages)."""
    m = Measured()
    for s in ("baseline", "masksub"):
        for run in sorted((out / "compare-core").glob(f"{s}-seed*/{s}-seed*")):
            t = _train_s(run)
            if t:
                m.train_s[(s, int(run.name.rsplit("seed", 1)[1]))] = t
    return m.budget_ratio()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


# -- reading the results and checking the goals ------------------------------------------------------
def read_bench_rows(out: Path, plan: list[Stage]) -> list[dict[str, Any]]:
    """Every bench row on disk, with ``goal_model`` (the GPU model it stands for) and ``stage``."""
    rows = []
    for stage in plan:
        if stage.kind != "bench":
            continue
        for f in sorted((out / stage.name).glob("*.json")):
            if f.name.startswith("_"):
                continue
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):  # a process stopped while writing it
                continue
            for r in data.get("rows", []):
                rows.append({**r, "goal_model": stage.goal_model, "stage": stage.name,
                             "device": data.get("meta", {}).get("device")})
    return rows


def fill_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios for rows whose bench process had no standard row of their kind (the second compiled
    stage): to the standard row of the same model, batch and compile setting from another stage
    of this evidence (same machine), named in ``ratio_to``."""
    std = {(r["goal_model"], r["model"], r["batch"], r["compile"]): r for r in rows if r["variant"] == "standard"}
    for r in rows:
        if r.get("time_ratio") is not None:
            continue
        s = std.get((r["goal_model"], r["model"], r["batch"], r["compile"]))
        if s is None:
            continue
        r["time_ratio"] = r["step_ms"] / s["step_ms"]
        r["memory_ratio"] = r["peak_bytes"] / s["peak_bytes"] if r.get("peak_bytes") and s.get("peak_bytes") else None
        r["flop_ratio"] = r["step_flops"] / s["step_flops"] if r.get("step_flops") and s.get("step_flops") else None
        r["ratio_to"] = s["stage"]


def check_bench_goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cost goals (``GOALS``) on eager rows, by the model each row stands for; a goal with no
    measured value is listed as not measured."""
    out = []
    for model, what, limit in GOALS:
        eager = [r for r in rows if r["goal_model"] == model and not r["compile"]]
        if what == "off":
            cand = [r for r in eager if r["variant"] == "off"]
            key, desc = "time_ratio", "sub-branch off / plain loop (time)"
        else:
            cand = [r for r in eager if r["variant"] == "masksub" and r["mode"] == "mask" and r["order"] == "memory"]
            key = "time_ratio" if what == "time" else "memory_ratio"
            desc = f"masksub memory / standard ({what})"
        value = cand[0].get(key) if cand else None
        out.append(dict(model=model, goal=desc, limit=limit,
                        measured=None if value is None else round(value, 4),
                        status="not measured" if value is None else ("met" if value <= limit else "NOT met")))
    return out


def read_compare_runs(out: Path, plan: list[Stage]) -> list[dict[str, Any]]:
    """Every compare run on disk (finished or cut): setting, seed, epochs done and planned,
    final and best top-1, training seconds."""
    from masksub.compare.plot import read_run

    runs = []
    for stage in plan:
        if stage.kind != "compare":
            continue
        for setting, seed in stage.runs():
            d = out / stage.name / f"{setting}-seed{seed}" / f"{setting}-seed{seed}"
            if not (d / "metrics.jsonl").is_file():
                continue
            run = read_run(d)
            planned = None
            cfg = d / "config.yaml"
            if cfg.is_file():
                import yaml

                planned = (yaml.safe_load(cfg.read_text()) or {}).get("epochs")
            tops = [e["top1"] for e in run["epochs"] if e.get("top1") is not None]
            runs.append(dict(setting=setting, seed=seed, stage=stage.name, dir=str(d), epochs=run["epochs"],
                             epochs_done=len(run["epochs"]), epochs_planned=planned,
                             complete=planned is not None and len(run["epochs"]) >= planned,
                             final_top1=tops[-1] if tops else None, best_top1=max(tops) if tops else None,
                             time_s=sum(e.get("time_s") or 0.0 for e in run["epochs"]) or None))
    return runs


def check_accuracy_goals(runs: list[dict[str, Any]], seeds: tuple[int, ...] = (0, 1)) -> list[dict[str, Any]]:
    """MaskSub >= standard + 1.5 points (final top-1) and masking-only below standard, per seed,
    from complete runs only (a cut run is not evidence)."""
    done = {(r["setting"], r["seed"]): r for r in runs if r["complete"]}
    out = []
    for seed in seeds:
        base = done.get(("baseline", seed))
        for setting, desc in (("masksub", f"masksub >= standard + {ACCURACY_GAIN} points"),
                              ("masking", "masking-only < standard")):
            other = done.get((setting, seed))
            if base is None or other is None:
                out.append(dict(seed=seed, goal=desc, standard=base and base["final_top1"],
                                value=other and other["final_top1"], status="not measured"))
                continue
            diff = other["final_top1"] - base["final_top1"]
            ok = diff >= ACCURACY_GAIN if setting == "masksub" else diff < 0
            out.append(dict(seed=seed, goal=desc, standard=base["final_top1"], value=other["final_top1"],
                            difference=round(diff, 2), status="met" if ok else "NOT met"))
    return out


def merge_compare(out: Path, runs: list[dict[str, Any]], plots: bool = True) -> list[dict[str, Any]]:
    """One table and (``plots``) one set of plots over every compare run on disk (``out/compare``)."""
    from masksub.compare.plot import plot_runs
    from masksub.compare.table import rows_from_runs, write_tables

    runs = [r for r in runs if r["epochs_done"]]  # a run stopped before its first epoch has nothing to show
    if not runs:
        return []
    order = {s: i for i, s in enumerate(("baseline", "masking", "masksub", "samebudget"))}
    runs = sorted(runs, key=lambda r: (order.get(r["setting"], 9), r["seed"]))
    rows = rows_from_runs(runs)
    d = out / "compare"
    write_tables(rows, d, f"{RECIPE}: every run of this evidence (runs of one stage shared the GPU)")
    if plots:
        plot_runs([r["dir"] for r in runs], d, title=RECIPE)
    return [{**row, "complete": r["complete"]} for row, r in zip(rows, runs, strict=True)]


def build_summary(out: Path, plan: list[Stage], *, rehearsal: bool, skipped: dict[str, str] | None = None,
                  meta: dict[str, Any] | None = None, plots: bool = True) -> dict[str, Any]:
    """Everything the call measured, read back from disk, with every goal checked."""
    skipped = skipped or {}
    stages = []
    for s in plan:
        f = out / s.name / "_stage.json"
        info = json.loads(f.read_text()) if f.is_file() else {"stage": s.name, "status": "not run"}
        if s.name in skipped and not f.is_file():
            info.update(status="skipped", why=skipped[s.name])
        info.pop("commands", None)
        stages.append(info)
    rows = read_bench_rows(out, plan)
    fill_ratios(rows)
    runs = read_compare_runs(out, plan)
    table_rows = merge_compare(out, runs, plots)
    left = [s["stage"] for s in stages if s["status"] != "done"]
    devices = sorted({r["device"] for r in rows if r.get("device")})
    return dict(
        meta={**(meta or {}), "rehearsal": rehearsal, "written": _now(), "devices": devices},
        stages=stages,
        bench=[{k: r.get(k) for k in ("goal_model", "model", "stage", "batch", "compile", "label", "step_ms",
                                      "time_ratio", "peak_bytes", "memory_ratio", "flop_ratio",
                                      "sub_flop_fraction", "mfu", "graphs", "graphs_in_timed_steps",
                                      "compiled_sub_differs", "host_syncs", "ratio_to")} for r in rows],
        bench_goals=check_bench_goals(rows),
        compare=table_rows,
        accuracy_goals=check_accuracy_goals(runs),
        left=left,
        rerun=("bash benchmarks/gpu_evidence.sh --stages " + ",".join(left)) if left else None,
    )


def _f(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_markdown(summary: dict[str, Any]) -> str:
    m = summary["meta"]
    lines = ["# GPU evidence" + (" (CPU REHEARSAL: tiny stand-ins, one epoch; no claim)" if m["rehearsal"] else ""),
             "", f"device: {', '.join(m['devices']) or m.get('device', 'n/a')}; written {m['written']}; "
             f"elapsed {m.get('elapsed_s', 'n/a')} s of a {m.get('budget_s', 'n/a')} s budget", "",
             "## Stages", "", "| stage | status | wall s | estimate s | note |", "|---|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s.get('wall_s', '')} | {s.get('estimate_s', '')} | "
                     f"{s.get('why', '')} |")
    lines += ["", "## Step cost (`masksub bench`)", "",
              "| model (stands for) | batch | compiled | step | ms | x std | GiB | mem x std | FLOPx |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["bench"]:
        gib = r["peak_bytes"] / 2**30 if r.get("peak_bytes") else None
        model = r["model"] if r["model"] == r["goal_model"] else f"{r['model']} ({r['goal_model']})"
        lines.append(f"| {model} | {r['batch']} | {'yes' if r['compile'] else 'no'} | {r['label']} | "
                     f"{_f(r['step_ms'], '.2f')} | {_f(r['time_ratio'])} | {_f(gib, '.2f')} | "
                     f"{_f(r['memory_ratio'])} | {_f(r['flop_ratio'])} |")
    lines += ["", "## Goals: step cost", "", "| model | goal | measured | limit | status |", "|---|---|---|---|---|"]
    for g in summary["bench_goals"]:
        lines.append(f"| {g['model']} | {g['goal']} | {_f(g['measured'])} | {g['limit']:.2f} | {g['status']} |")
    lines += ["", "## Accuracy (`masksub compare --recipe fashion-mnist`)", "",
              "| setting | seed | epochs | final top-1 | best top-1 | train s | cost vs baseline | complete |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary["compare"]:
        lines.append(f"| {r['setting']} | {r['seed']} | {r['epochs']} | {_f(r['final_top1'], '.2f')} | "
                     f"{_f(r['best_top1'], '.2f')} | {_f(r['time_s'], '.0f')} | {_f(r['cost_vs_baseline'], '.2f')} | "
                     f"{'yes' if r.get('complete') else 'NO'} |")
    ref = ", ".join(f"{k} {a:.2f} / {b:.2f}" for k, (a, b) in REFERENCE_TOP1.items())
    lines += ["", f"Reference (benchmarks/README.md, H200; seeds 0 / 1): {ref}. Runs of one stage shared the GPU: "
              "their times are indicative; the bench is the cost measurement.", "",
              "## Goals: accuracy", "", "| seed | goal | standard | value | difference | status |",
              "|---|---|---|---|---|---|"]
    for g in summary["accuracy_goals"]:
        lines.append(f"| {g['seed']} | {g['goal']} | {_f(g['standard'], '.2f')} | {_f(g['value'], '.2f')} | "
                     f"{_f(g.get('difference'), '+.2f')} | {g['status']} |")
    if summary["left"]:
        lines += ["", f"Not done in this call: {', '.join(summary['left'])}. To run them: `{summary['rerun']}`"]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    _write_json(out / "summary.json", summary)
    tmp = out / "summary.md.tmp"
    tmp.write_text(summary_markdown(summary))
    tmp.replace(out / "summary.md")


def _keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    name = Path(info.name).name
    if name.endswith((".pt", ".pth", ".tmp")) or name.startswith("events.out.tfevents"):
        return None
    return info


def export(out: Path, dest: Path) -> list[Path]:
    """A copy of the results in ``dest`` (``--archive``): one archive of the results folder,
    checkpoints excluded, plus the summary and the log: four plain files, easy to carry away."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "gpu-evidence.tar.gz"
    tmp = dest / "gpu-evidence.tar.gz.part"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=_keep)
    tmp.replace(archive)
    written = [archive]
    for name in ("summary.md", "summary.json", "evidence.log"):
        if (out / name).is_file():
            shutil.copyfile(out / name, dest / name)
            written.append(dest / name)
    return written


# -- set-up checks -----------------------------------------------------------------------------------
def find_data(data_dir: str | None) -> Path | None:
    """The Fashion-MNIST IDX files: --data-dir, else the staged copy, else Debian's package."""
    cands = [Path(data_dir)] if data_dir else [DATA_STAGED, FMNIST_DEBIAN]
    for d in cands:
        if all((d / f).is_file() for f in FMNIST_FILES):
            return d.resolve()
    return None


def stage_data(dest: Path = DATA_STAGED) -> Path:
    """Copy Debian's Fashion-MNIST into the repository (ignored by git): a GPU machine without
    that package or without internet finds it there when the working tree is copied to it."""
    if not all((FMNIST_DEBIAN / f).is_file() for f in FMNIST_FILES):
        raise MaskSubError(f"no Fashion-MNIST in {FMNIST_DEBIAN}: install dataset-fashion-mnist "
                           "(sudo apt-get install dataset-fashion-mnist) on this machine first")
    dest.mkdir(parents=True, exist_ok=True)
    for f in FMNIST_FILES:
        shutil.copyfile(FMNIST_DEBIAN / f, dest / f)
    return dest


def check_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise MaskSubError("no CUDA device visible to torch. This call measures GPU claims: run it on an "
                           "H100/H200 (benchmarks/README.md), or pass --rehearsal for the CPU rehearsal "
                           "(tiny stand-ins, one epoch)")
    return torch.cuda.get_device_name(0)


# -- command line -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu_evidence.sh",
        description="The GPU evidence in one call: masksub bench (5 models) and masksub compare "
                    "(Fashion-MNIST, seeds 0 and 1) under a time budget; results in benchmarks/results/gpu/.",
        epilog="stages, in order: " + ", ".join(s.name for s in make_plan()))
    p.add_argument("--rehearsal", action="store_true",
                   help="CPU rehearsal: the same stages on tiny stand-ins, one epoch, a small subset")
    p.add_argument("--budget", type=float, default=None,
                   help=f"wall seconds for the whole call (default {BUDGET_S:.0f}; rehearsal 1800)")
    p.add_argument("--stages", default=None, help="comma list of stages to run (default: all, in order)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default {DEFAULT_OUT}; rehearsal {REHEARSAL_OUT})")
    p.add_argument("--data-dir", default=None,
                   help=f"Fashion-MNIST IDX files (default: {DATA_STAGED}, else {FMNIST_DEBIAN})")
    p.add_argument("--jobs", type=int, default=4, help="compare runs side by side on the one GPU (default 4)")
    p.add_argument("--stage-data", action="store_true",
                   help=f"copy Debian's Fashion-MNIST into {DATA_STAGED} (for a GPU machine without it) and stop")
    p.add_argument("--archive", type=Path, default=None,
                   help="after every stage, also pack the results (checkpoints excluded), the summary and "
                        "the log into this folder: a copy that survives a call cut short")
    p.add_argument("--summary-only", action="store_true",
                   help="no work: rebuild summary.md/json, the merged table and plots from the results on disk")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except MaskSubError as e:
        print(f"gpu_evidence: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.stage_data:
        dest = stage_data()
        print(f"copied Fashion-MNIST to {dest}; copy {DATA_STAGED.parent}/ along to a GPU machine without it")
        return 0
    plan = make_plan(args.rehearsal)
    stages = select(plan, args.stages)
    out = args.out or (REHEARSAL_OUT if args.rehearsal else DEFAULT_OUT)
    if args.summary_only:
        summary = build_summary(out, plan, rehearsal=args.rehearsal)
        write_summary(out, summary)
        print(summary_markdown(summary))
        return 0
    # every check before any work: typos in flags, the GPU, the data
    if args.jobs < 1:
        raise MaskSubError(f"--jobs must be >= 1, got {args.jobs}")
    budget = args.budget if args.budget is not None else (1800.0 if args.rehearsal else BUDGET_S)
    guard = TimeGuard(budget)
    device = "cpu (rehearsal)" if args.rehearsal else check_cuda()
    data_dir = None
    if any(s.kind == "compare" for s in stages):
        data_dir = find_data(args.data_dir)
        if data_dir is None:
            raise MaskSubError(
                f"Fashion-MNIST not found ({args.data_dir or f'{DATA_STAGED}, {FMNIST_DEBIAN}'}); this call downloads "
                f"nothing. Install dataset-fashion-mnist, or run `bash benchmarks/gpu_evidence.sh --stage-data` on a "
                f"machine that has it and copy {DATA_STAGED.parent}/ along; or leave compare out with --stages")
    out.mkdir(parents=True, exist_ok=True)
    export_dir = args.archive
    logf = (out / "evidence.log").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"gpu_evidence: {device}; budget {budget:.0f} s; {len(stages)} stage(s): {', '.join(s.name for s in stages)}; "
        f"results in {out}" + (f", packed into {export_dir}" if export_dir else ""))
    ev = Evidence(out, stages, plan, guard, rehearsal=args.rehearsal, data_dir=data_dir, jobs=args.jobs,
                  export=export_dir, log=log)
    ev.meta.update(device=device, budget_s=budget, started=_now(), argv=sys.argv[1:])
    try:
        summary = ev.run()
    finally:
        logf.close()
    if "stages" in summary:
        print(summary_markdown(summary))
    statuses = summary["meta"].get("statuses", {})
    return 1 if any(v in ("failed", "cut") for v in statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
