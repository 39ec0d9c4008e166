"""``masksub bench``: the cost of a MaskSub step beside a plain step, measured in one run.

Every setting gets a fresh copy of the same initial model, the same random batch, fused
AdamW and bf16 autocast (GPU). A step is timed from the first forward to the optimizer step
with CUDA events (no host sync inside the timed steps), after warm-up steps (compilation
happens there); the row holds the median. Peak memory is ``max_memory_allocated`` over the
timed steps. FLOPs are counted with torch's ``FlopCounterMode`` on the same work, eagerly.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..branches.base import MODES
from ..errors import MaskSubError, check_ratio
from ..step import ORDERS, resolve_amp_dtype
from .flops import count_flops, device_name, mfu, peak_tflops
from .steps import (
    GPU_MODELS,
    MODELS,
    PARTS,
    TINY_MODELS,
    VARIANTS,
    Step,
    build_model,
    make_step,
)

DTYPES = ("bf16", "fp16", "fp32")  # autocast names, resolved by the core (masksub.step.AMP_DTYPES)

# The paper's claim on cost (Heo et al., CVPR 2025): with MAE-style token removal, "MaskSub with
# 50% masking requires x1.5 computation to standard training" (Sec. 3.1); where the sub forward
# keeps its size (ResNet zeroed patches, Swin mask tokens: "MaskSub costs double the training
# budget", Sec. 4.3; DropSub and PathSub, Table 13) x2; and the main branch's backward before the
# sub forward "eliminates the need for additional VRAM" (Sec. 3.1).
PAPER_CLAIM_TEXT = ("the paper's claim: about x1.5 the computation of standard training for ViT at 50% "
                    "masking (masked tokens removed), x2 for CNNs and Swin (and DropSub, PathSub), "
                    "no extra memory (two backward passes)")


@dataclass(frozen=True)
class Setting:
    model: str
    variant: str
    mode: str | None = None
    order: str | None = None
    compile: bool = False
    family: str | None = None

    @property
    def label(self) -> str:
        parts = [self.variant]
        if self.variant == "masksub":
            parts += [self.mode or "", self.order or ""]
            if self.family:
                parts.append(f"[{self.family}]")
        elif self.variant == "paper":
            parts += [self.mode or "mask", "two-backward"]
        elif self.variant == "part_sub":
            parts += [self.mode or "mask", "fwd+bwd"]
        elif self.variant == "part_main":
            parts += ["fwd+bwd"]
        elif self.variant == "part_opt":
            parts += ["AdamW step"]
        return " ".join(parts)


def _csv(choices: tuple[str, ...] | None = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; pick from {', '.join(choices)}")
        return items
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Without --models/--modes/--orders/--variants/--compile it runs the default plan: on a GPU "
        "every model eager in mask mode (standard, off, paper, both orders), ViT-B/16 compiled "
        "and ViT-B/16 in dropout and droppath; on CPU the same plan on tiny models."
    )
    parser.add_argument("--models", type=_csv(tuple(MODELS)), default=None,
                        help=f"comma list from {', '.join(MODELS)}")
    parser.add_argument("--modes", type=_csv(MODES), default=None, help="comma list of mask,dropout,droppath")
    parser.add_argument("--orders", type=_csv(ORDERS), default=None, help="comma list of memory,fused")
    parser.add_argument("--variants", type=_csv(VARIANTS + PARTS), default=None,
                        help="comma list of standard,off,paper,masksub (default: these four) and the step's "
                             "pieces timed alone: part_main, part_sub, part_opt")
    parser.add_argument("--compile", nargs="?", const="on", choices=("off", "on", "both"), default=None,
                        help="torch.compile the model: on, off or both (flag alone: on)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; 'eager' only traces: a quick CPU "
                             "rehearsal of the compiled rows, not a timing)")
    parser.add_argument("--batch", type=str, default=None,
                        help="batch for every model (e.g. 64) or per model (vit_b=128,vit_l=32)")
    parser.add_argument("--family", default=None,
                        help="masksub family for the mask rows (e.g. vit_token); default: detected")
    parser.add_argument("--ratio", type=float, default=None, help="sub-branch strength (default: the paper's)")
    parser.add_argument("--drop-path", type=float, default=0.1, help="model drop-path rate (default 0.1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (GPU 30, CPU 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (GPU 8, CPU 1)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="autocast dtype (GPU bf16, CPU fp32)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak FLOP/s for MFU when the GPU is not in masksub.bench.flops.PEAK_BF16_TFLOPS")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON and table")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="step time statistic (min suits a CPU shared with other work)")
    parser.add_argument("--interleave", action="store_true",
                        help="time the eager settings of a model in turns, one step each (for a shared "
                             "CPU/GPU; host-synced steps, no peak memory)")
    parser.add_argument("--seed", type=int, default=0)


# -- the plan ---------------------------------------------------------------------------------
def default_plan(models: tuple[str, ...], gpu: bool) -> list[Setting]:
    plan: list[Setting] = []
    for m in models:
        plan += [Setting(m, "standard"), Setting(m, "off"), Setting(m, "paper", "mask")]
        plan += [Setting(m, "masksub", "mask", o) for o in ORDERS]
        plan += [Setting(m, "part_main"), Setting(m, "part_sub", "mask"), Setting(m, "part_opt")]
    focus = "vit_b" if gpu else models[0]
    # Compiled: no "off" row (its graph is the standard one); compilation is the plan's big cost.
    plan += [Setting(focus, "standard", compile=True), Setting(focus, "paper", "mask", compile=True)]
    plan += [Setting(focus, "masksub", "mask", o, compile=True) for o in ORDERS]
    plan += [Setting(focus, "masksub", md, o) for md in ("dropout", "droppath") for o in ORDERS]
    return plan


def grid_plan(args: argparse.Namespace, models: list[str]) -> list[Setting]:
    modes = args.modes or ["mask"]
    orders = args.orders or list(ORDERS)
    variants = args.variants or list(VARIANTS)
    compiles = {"on": [True], "off": [False], "both": [False, True], None: [False]}[args.compile]
    plan: list[Setting] = []
    for m in models:
        for c in compiles:
            for v in variants:
                if v in ("standard", "off", "part_main", "part_opt"):
                    plan.append(Setting(m, v, compile=c))
                elif v == "paper":
                    if "mask" in modes:
                        plan.append(Setting(m, v, "mask", compile=c))
                elif v == "part_sub":
                    plan += [Setting(m, v, md, compile=c, family=args.family if md == "mask" else None)
                             for md in modes]
                else:
                    plan += [Setting(m, v, md, o, c, args.family if md == "mask" else None)
                             for md in modes for o in orders]
    return plan


def parse_batches(text: str | None, models: list[str]) -> dict[str, int]:
    batches = {m: MODELS[m].batch for m in models}
    if not text:
        return batches
    for part in text.split(","):
        name, _, value = part.rpartition("=")
        try:
            b = int(value)
        except ValueError:
            raise MaskSubError(f"--batch takes N or MODEL=N[,MODEL=N], got {text!r}") from None
        if b < 1:
            raise MaskSubError(f"--batch must be positive, got {b}")
        if not name:
            batches = {m: b for m in models}
        elif name not in batches:
            raise MaskSubError(f"--batch names {name!r}, which is not among --models {models}")
        else:
            batches[name] = b
    return batches


# -- measuring ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def count_host_syncs(step: Step, device: torch.device) -> int | None:
    """Host syncs in one (warm) step, from CUDA's sync debug mode; None off CUDA. A sync stalls
    the CPU until the GPU drains, so kernel launches stop overlapping with GPU work."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def time_steps(step: Step, device: torch.device, warmup: int, steps: int) -> tuple[list[float], int | None, int]:
    """Per-step milliseconds, peak bytes during the timed steps (None on CPU), graphs compiled
    during the timed steps (should be 0: a recompile there means a shape or guard keeps changing)."""
    for _ in range(warmup):
        step.run()
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g0 = _graphs()
    times: list[float] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step.run()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        for _ in range(steps):
            t = time.perf_counter()
            step.run()
            times.append((time.perf_counter() - t) * 1e3)
        peak = None
    return times, peak, _graphs() - g0


def build(setting: Setting, base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
          args: argparse.Namespace, device: torch.device, amp: torch.dtype | None,
          flop_cache: dict[tuple, dict[str, Any]]) -> tuple[Step, torch.nn.Module, dict[str, Any]]:
    """A fresh copy of the model wired into the setting's step, and its counted FLOPs."""
    if setting.compile:
        torch._dynamo.reset()  # each compiled setting starts from empty caches, none shares a limit
    model = copy.deepcopy(base).to(device)  # the base stays on the host: not in this row's peak
    fused = device.type == "cuda"

    def make_opt(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=fused)

    step = make_step(setting.variant, model, x, y, mode=setting.mode or "mask", order=setting.order or "memory",
                     ratio=args.ratio, compile=setting.compile,
                     compile_backend=getattr(args, "compile_backend", "inductor"), amp_dtype=amp, make_optimizer=make_opt,
                     family=setting.family)
    key = (setting.model, setting.variant, setting.mode, setting.order, setting.family, x.shape[0])
    if key not in flop_cache:
        ac = torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)
        step_flops = count_flops(step.count)
        for p in step.params:
            p.grad = None
        with torch.no_grad(), ac:
            main_f = count_flops(step.main)
            sub_f = count_flops(step.sub) if step.sub is not None else None
        flop_cache[key] = dict(step_flops=step_flops, main_fwd_flops=main_f, sub_fwd_flops=sub_f)
    return step, model, flop_cache[key]


def make_row(setting: Setting, times: list[float], peak: int | None, fl: dict[str, Any], batch: int,
             stat: str, graphs: int | None = None, graphs_timed: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = asdict(setting)
    ms = statistics.median(times) if stat == "median" else min(times)
    row.update(
        label=setting.label, batch=batch, step_ms=ms, step_ms_median=statistics.median(times),
        step_ms_min=min(times), step_ms_max=max(times), peak_bytes=peak, images_per_s=batch / (ms / 1e3),
        **fl,
        sub_flop_fraction=(fl["sub_fwd_flops"] / fl["main_fwd_flops"]) if fl["sub_fwd_flops"] else None,
        graphs=graphs, graphs_in_timed_steps=graphs_timed,
    )
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(setting: Setting, base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            args: argparse.Namespace, device: torch.device, amp: torch.dtype | None,
            flop_cache: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    """One setting on its own: warm-up, timed steps, peak memory of the timed steps."""
    step, model, fl = build(setting, base, x, y, args=args, device=device, amp=amp, flop_cache=flop_cache)
    graphs0 = _graphs()
    times, peak, recompiled = time_steps(step, device, args.warmup, args.steps)
    syncs = count_host_syncs(step, device)
    row = make_row(setting, times, peak, fl, int(x.shape[0]), args.stat,
                   (_graphs() - graphs0) if setting.compile else None, recompiled if setting.compile else None)
    row["host_syncs"] = syncs
    if setting.compile and setting.mode == "mask" and setting.order != "fused":
        row["compiled_sub_differs"] = _compiled_sub_differs(setting, model, x, args.ratio)
    del step, model
    if setting.compile:
        torch._dynamo.reset()  # compiled code must not keep this row's model alive into the next
    _release(device)
    return row


def measure_interleaved(settings: list[Setting], base: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        args: argparse.Namespace, device: torch.device, amp: torch.dtype | None,
                        flop_cache: dict[tuple, dict[str, Any]]) -> list[dict[str, Any]]:
    """Eager settings side by side, one step of each in turn: load from other work on a shared
    machine then falls on every setting alike. No peak memory (all copies are alive at once)."""
    built = [build(s, base, x, y, args=args, device=device, amp=amp, flop_cache=flop_cache) for s in settings]
    for _ in range(args.warmup):
        for step, _m, _f in built:
            step.run()
    _sync(device)
    times: list[list[float]] = [[] for _ in built]
    for _ in range(args.steps):
        for i, (step, _m, _f) in enumerate(built):
            _sync(device)
            t = time.perf_counter()
            step.run()
            _sync(device)
            times[i].append((time.perf_counter() - t) * 1e3)
    rows = [make_row(s, t, None, f, int(x.shape[0]), args.stat) for s, t, (_st, _m, f) in zip(settings, times, built, strict=True)]
    del built
    _release(device)
    return rows


def _compiled_sub_differs(setting: Setting, model: torch.nn.Module, x: torch.Tensor,
                          ratio: float | None) -> bool:
    """Under torch.compile, does the sub forward still mask? (Dynamo skips guards on module
    hooks by default, so a hook added for the sub forward can be silently ignored.)"""
    from ..step import MaskSub
    from .steps import PaperRecipeModel

    net = copy.deepcopy(model).eval()
    xs = x[:2]
    with torch.no_grad():  # backend "eager": the guards are dynamo's, no need to pay inductor
        if setting.variant == "paper":
            ref = torch.compile(PaperRecipeModel(net).to(x.device), backend="eager")
            a, b = ref(xs), ref(xs, mask_ratio=0.5 if ratio is None else ratio)
        else:
            ms = MaskSub(torch.compile(net, backend="eager"), mode="mask", ratio=ratio, family=setting.family)
            a, b = ms.forward_main(xs), ms.forward_sub(xs)
    return not torch.allclose(a.float(), b.float())


# -- report -------------------------------------------------------------------------------------
def add_ratios(rows: list[dict[str, Any]], peak: float | None) -> None:
    """Time, memory and FLOP ratios to the standard step of the same model, batch and compile."""
    std = {(r["model"], r["batch"], r["compile"]): r for r in rows if r["variant"] == "standard"}
    std_eager = {(r["model"], r["batch"]): r for r in rows if r["variant"] == "standard" and not r["compile"]}
    for r in rows:
        s = std.get((r["model"], r["batch"], r["compile"])) or std_eager.get((r["model"], r["batch"]))
        r["time_ratio"] = r["step_ms"] / s["step_ms"] if s else None
        r["memory_ratio"] = (r["peak_bytes"] / s["peak_bytes"]) if s and r["peak_bytes"] and s["peak_bytes"] else None
        r["flop_ratio"] = r["step_flops"] / s["step_flops"] if s and s["step_flops"] else None
        r["mfu"] = mfu(r["step_flops"], r["step_ms"], peak)


def paper_compute(model: str, mode: str | None) -> float:
    """The paper's compute ratio for a MaskSub step of this model and mode: x1.5 where the sub
    forward drops half the tokens (ViT, mask mode), else x2 (its forward keeps the full size)."""
    return 1.5 if mode == "mask" and MODELS[model].timm_name.startswith("vit_") else 2.0


def paper_claim(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each eager two-branch row (MaskSub, or the paper's recipe) beside the paper's claim: its
    time, FLOP and memory ratios to the standard step, and the paper's compute and memory ratios.
    The memory claim holds for the two-backward order only (``memory`` and the paper's recipe)."""
    out = []
    for r in rows:
        if r["compile"] or r["variant"] not in ("masksub", "paper") or r.get("time_ratio") is None:
            continue
        two_backward = r["variant"] == "paper" or r["order"] == "memory"
        out.append(dict(model=r["model"], label=r["label"], time_ratio=r["time_ratio"], flop_ratio=r["flop_ratio"],
                        memory_ratio=r["memory_ratio"], paper_compute=paper_compute(r["model"], r["mode"] or "mask"),
                        paper_memory=1.0 if two_backward else None))
    return out


def breakdown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model (eager): the pieces timed alone against the whole MaskSub step, and how fast the
    sub-branch turns FLOPs into work compared with the main branch (1.0 = as efficient)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        got = {r["variant"]: r for r in rows if r["model"] == model and not r["compile"]
               and r["mode"] in (None, "mask") and r["order"] in (None, "memory")}
        if not all(p in got for p in PARTS):
            continue
        main, sub, opt = (got[p] for p in PARTS)
        item = dict(model=model, main_ms=main["step_ms"], sub_ms=sub["step_ms"], opt_ms=opt["step_ms"],
                    parts_ms=main["step_ms"] + sub["step_ms"] + opt["step_ms"],
                    sub_time_fraction=sub["step_ms"] / main["step_ms"],
                    sub_flop_fraction=sub["step_flops"] / main["step_flops"] if main["step_flops"] else None)
        if item["sub_flop_fraction"]:
            item["sub_efficiency"] = item["sub_flop_fraction"] / item["sub_time_fraction"]
        for v in ("masksub", "paper", "standard"):
            if v in got:
                item[f"{v}_ms"] = got[v]["step_ms"]
        if "standard" in got:
            # The best a two-branch step can do with these pieces: the standard step plus the sub.
            item["parts_ratio"] = (got["standard"]["step_ms"] + sub["step_ms"]) / got["standard"]["step_ms"]
        out.append(item)
    return out


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], claim: list[dict[str, Any]], meta: dict[str, Any],
          parts: list[dict[str, Any]] | None = None) -> str:
    head = (f"{'model':<11} {'batch':>5} {'cmp':<3} {'step':<30} {'ms':>8} {'x std':>6} "
            f"{'GiB':>6} {'x std':>6} {'img/s':>8} {'sub/main':>8} {'FLOPx':>6} {'MFU':>5} {'graphs':>6}")
    lines = [f"masksub bench on {meta['device']} ({meta['dtype']}, {meta['stat']} of {meta['steps']} steps "
             f"after {meta['warmup']} warm-up; {meta['date']})", head, "-" * len(head)]
    for r in rows:
        gib = r["peak_bytes"] / 2**30 if r["peak_bytes"] else None
        lines.append(
            f"{r['model']:<11} {r['batch']:>5} {'yes' if r['compile'] else 'no':<3} {r['label']:<30} "
            f"{r['step_ms']:>8.2f} {_fmt(r['time_ratio'], '.3f'):>6} {_fmt(gib, '.2f'):>6} "
            f"{_fmt(r['memory_ratio'], '.3f'):>6} {r['images_per_s']:>8.1f} "
            f"{_fmt(r['sub_flop_fraction'], '.3f'):>8} {_fmt(r['flop_ratio'], '.3f'):>6} "
            f"{_fmt(r['mfu'] * 100 if r['mfu'] is not None else None, '.1f'):>5} "
            f"{_fmt(r['graphs'], 'd'):>6}"
        )
    for r in rows:
        if r.get("compiled_sub_differs") is False:
            lines.append(f"WARNING {r['model']} compiled {r['label']}: the compiled sub forward equals the main "
                         "forward (no masking under torch.compile); its time is not a MaskSub step")
        if r.get("host_syncs"):
            lines.append(f"NOTE {r['model']} {r['label']}: {r['host_syncs']} host sync(s) per step "
                         "(torch.cuda.set_sync_debug_mode)")
        if r.get("graphs_in_timed_steps"):
            lines.append(f"WARNING {r['model']} compiled {r['label']}: {r['graphs_in_timed_steps']} graph(s) "
                         "compiled during the timed steps (a guard keeps failing); raise --warmup or fix the cause")
    if parts:
        lines.append("")
        lines.append("where the time goes (eager, pieces timed alone): main fwd+bwd | sub fwd+bwd | AdamW | "
                     "sub time/main time | sub FLOPs/main FLOPs | sub efficiency | (standard + sub) / standard")
        for p in parts:
            lines.append(f"  {p['model']:<11} {p['main_ms']:8.2f} | {p['sub_ms']:8.2f} | {p['opt_ms']:7.2f} | "
                         f"{p['sub_time_fraction']:.3f} | {_fmt(p['sub_flop_fraction'], '.3f')} | "
                         f"{_fmt(p.get('sub_efficiency'), '.3f')} | {_fmt(p.get('parts_ratio'), '.3f')}")
    if claim:
        lines.append("")
        lines.append(PAPER_CLAIM_TEXT + "; measured here (eager, ratios to the standard step):")
        lines.append(f"  {'model':<11} {'step':<30} {'time':>6} {'FLOPx':>6} {'paper':>6}   "
                     f"{'memory':>6} {'paper':>6}")
        for c in claim:
            lines.append(f"  {c['model']:<11} {c['label']:<30} {c['time_ratio']:>6.3f} "
                         f"{_fmt(c['flop_ratio'], '.3f'):>6} {'x' + format(c['paper_compute'], '.1f'):>6}   "
                         f"{_fmt(c['memory_ratio'], '.3f'):>6} "
                         f"{'x1.0' if c['paper_memory'] else '-':>6}")
    lines.append("columns: x std = ratio to the standard step (same model, batch, compile); sub/main = "
                 "counted sub-forward FLOPs / main-forward FLOPs; FLOPx = counted step FLOPs / standard "
                 "step FLOPs; MFU = counted step FLOPs per second / peak (%); graphs = dynamo graphs compiled")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def _progress(model_name: str, row: dict[str, Any]) -> None:
    print(f"  {model_name:<11} {'compiled ' if row['compile'] else ''}{row['label']:<30} "
          f"{row['step_ms']:8.2f} ms  ({row['wall_s']:.1f} s)", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MaskSubError("--device cuda but torch sees no GPU; use --device cpu (tiny models)")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True  # every row alike; the convolutions pick their kernels once
    args.steps = args.steps if args.steps is not None else (30 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (8 if gpu else 1)
    if args.steps < 1 or args.warmup < 0:
        raise MaskSubError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.ratio is not None:
        check_ratio(args.ratio, "--ratio", allow_zero=False)
    check_ratio(args.drop_path, "--drop-path")
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    amp = resolve_amp_dtype(dtype_name)
    custom = any(v is not None for v in (args.modes, args.orders, args.variants, args.compile))
    models = args.models or list(GPU_MODELS if gpu else TINY_MODELS)
    plan = grid_plan(args, models) if (custom or args.models) else default_plan(tuple(models), gpu)
    batches = parse_batches(args.batch, sorted({s.model for s in plan}))
    name = device_name(device)
    peak = args.peak_tflops or (peak_tflops(name) if gpu else None)
    meta = dict(date=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), device=name, dtype=dtype_name,
                steps=args.steps, warmup=args.warmup, stat=args.stat, interleave=args.interleave,
                peak_tflops=peak, torch=torch.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(), argv=sys.argv[1:],
                drop_path=args.drop_path, ratio=args.ratio, compile_backend=args.compile_backend, optimizer="AdamW fused" if gpu else "AdamW")
    try:
        import timm

        meta["timm"] = timm.__version__
    except ImportError as e:
        raise MaskSubError("masksub bench needs timm (pip install 'masksub[timm]')") from e
    from .. import __version__

    meta["masksub"] = __version__
    rows: list[dict[str, Any]] = []
    flop_cache: dict[tuple, dict[str, Any]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d')}_{_slug(name)}.json"
    save = _saver(json_path, rows, meta, peak)
    t_start = time.perf_counter()
    for model_name in dict.fromkeys(s.model for s in plan):
        torch.manual_seed(args.seed)
        spec = MODELS[model_name]
        base = build_model(model_name, args.drop_path)
        b = batches[model_name]
        x = torch.randn(b, 3, spec.img, spec.img, device=device)
        y = torch.randint(0, spec.num_classes, (b,), device=device)
        todo = [s for s in plan if s.model == model_name]
        kw = dict(args=args, device=device, amp=amp, flop_cache=flop_cache)
        if args.interleave:
            t = time.perf_counter()
            eager = [s for s in todo if not s.compile]
            got = measure_interleaved(eager, base, x, y, **kw) if eager else []
            for row in got:
                row["wall_s"] = round((time.perf_counter() - t) / len(got), 2)
                _progress(model_name, row)
            rows += got
            save()
            todo = [s for s in todo if s.compile]
        for setting in todo:
            t = time.perf_counter()
            row = measure(setting, base, x, y, **kw)
            row["wall_s"] = round(time.perf_counter() - t, 2)
            rows.append(row)
            _progress(model_name, row)
            save()
        del base, x, y
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["complete"] = True
    claim, parts = save()
    text = table(rows, claim, meta, parts)
    print(text)
    json_path.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {json_path} and .txt", file=sys.stderr)
    return 0


def _saver(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any],
           peak: float | None) -> Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Rewrites the JSON with every row measured so far, after each row: a run stopped by a time
    limit keeps what it measured (``meta.complete`` stays false until the last row). Each write
    replaces the file whole, so a reader never sees half a file."""
    meta["complete"] = False

    def save() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        add_ratios(rows, peak)
        claim, parts = paper_claim(rows), breakdown(rows)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(dict(meta=meta, rows=rows, breakdown=parts, paper_claim=claim), indent=1) + "\n")
        tmp.replace(path)
        return claim, parts

    return save
