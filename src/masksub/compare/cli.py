"""``masksub compare``: the paper's Figure 2 / Table 13 experiment on any recipe.

Runs the settings one after another, everything else identical (recipe, seed, data order),
then writes ``results.md`` / ``results.csv`` / ``results.json`` and the plots into one folder.
The ``samebudget`` setting is the paper's Table 8 row: standard training given the epochs that
match MaskSub's *measured* cost in this very comparison.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

from ..errors import MaskSubError

SETTINGS: dict[str, dict[str, Any]] = {
    "baseline": {"sub": "none", "ratio": None},             # Eq. (1)
    "masking": {"sub": "mask", "masking_only": True},       # Eq. (2): masking on the only branch
    "masksub": {"sub": "mask"},
    "dropsub": {"sub": "dropout"},
    "pathsub": {"sub": "droppath"},
    "samebudget": {"sub": "none", "ratio": None},           # epochs set from the measured cost
}
# A CPU-sized version of any recipe: a subset, a smaller model, a couple of epochs.
QUICK = {"epochs": 2, "warmup_epochs": 0.5, "subset": 2048, "val_subset": 1024, "batch_size": 128,
         "amp": "none", "analysis_subset": 512, "grad_norm_every": 4, "log_every": 4}


def _parse_list(text: str, what: str, conv=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise MaskSubError(f"--{what} is empty")
    try:
        return [conv(t) for t in items]
    except ValueError:
        raise MaskSubError(f"--{what} must be a comma-separated list, got {text!r}") from None


def run_compare(recipe: str, settings: list[str], seeds: list[int], out_dir: str | Path,
                overrides: dict[str, Any] | None = None, budget_ratio: float | None = None,
                analysis: bool = True) -> dict[str, Any]:
    """Train every (setting, seed); returns the results dict also written to results.json."""
    from ..train import config as C
    from ..train.engine import train
    from .plot import plot_runs, read_run
    from .table import rows_from_runs, write_tables

    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise MaskSubError(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    if "samebudget" in settings and budget_ratio is None and not {"baseline", "masksub"} <= set(settings):
        raise MaskSubError("samebudget needs baseline and masksub in --settings (to measure the cost) or --budget-ratio")
    overrides = dict(overrides or {})
    base_cfg = C.load(recipe, overrides)  # every bad key / value fails here, before any training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = [s for s in settings if s != "samebudget"] + (["samebudget"] if "samebudget" in settings else [])
    runs: list[dict[str, Any]] = []
    for setting in order:
        for seed in seeds:
            ov = {**overrides, **SETTINGS[setting], "seed": seed, "output": str(out),
                  "run_name": f"{setting}-seed{seed}", "analysis": analysis}
            if setting == "samebudget":
                ratio = budget_ratio if budget_ratio is not None else _measured_cost(runs)
                ov["epochs"] = max(1, math.ceil(base_cfg.epochs * ratio - 1e-9))
                ov["warmup_epochs"] = base_cfg.warmup_epochs
            cfg = C.load(recipe, ov)
            print(f"== compare: {setting}, seed {seed}: {cfg.epochs} epochs ==", flush=True)
            summary = train(cfg)
            run = read_run(out / ov["run_name"])
            # training time only (epoch lines), not evaluation or the analysis passes
            train_s = sum(e.get("time_s") or 0.0 for e in run["epochs"]) or summary.get("time_s")
            runs.append({"setting": setting, "seed": seed, "dir": run["dir"], "epochs": run["epochs"],
                         "time_s": train_s, "summary": summary})
    rows = rows_from_runs(runs)
    title = f"{recipe}: {', '.join(order)}; seeds {', '.join(map(str, seeds))}"
    md, cs = write_tables(rows, out, title)
    plots = plot_runs([r["dir"] for r in runs], out, title=recipe)
    result = {"recipe": recipe, "overrides": overrides, "settings": order, "seeds": seeds,
              "rows": rows, "runs": runs, "tables": [str(md), str(cs)], "plots": [str(p) for p in plots]}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(md.read_text())
    print(f"compare: table {md}, plots {', '.join(p.name for p in plots)} in {out}")
    return result


def _measured_cost(runs: list[dict[str, Any]]) -> float:
    def mean_time(setting: str) -> float:
        ts = [r["time_s"] for r in runs if r["setting"] == setting and r["time_s"]]
        return sum(ts) / len(ts) if ts else float("nan")

    ratio = mean_time("masksub") / mean_time("baseline")
    if not math.isfinite(ratio) or ratio <= 0:
        raise MaskSubError("could not measure MaskSub's cost for the samebudget row; pass --budget-ratio")
    return ratio


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.cli_train import add_arguments as train_arguments

    train_arguments(p)  # the same overrides as masksub train (--epochs, --set k=v, ...)
    p.add_argument("--settings", default="baseline,masking,masksub",
                   help=f"comma-separated, from: {', '.join(SETTINGS)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--out", default=None, help="folder for runs, table and plots")
    p.add_argument("--budget-ratio", type=float, default=None,
                   help="cost of MaskSub vs baseline for the samebudget row (default: measured here)")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized: a 2048-image subset, 2 epochs, fp32 (any override still wins)")
    p.add_argument("--no-analysis", dest="analysis", action="store_false",
                   help="skip the masked/unmasked train-loss and gradient-norm measurements")


def main(args: argparse.Namespace) -> int:
    from ..train.cli_train import overrides

    if not args.recipe:
        raise MaskSubError("give --recipe NAME (see `masksub train --list`)")
    if args.resume:
        raise MaskSubError("compare does not take --resume; resume a single run with masksub train --resume")
    ov = {**(QUICK if args.quick else {}), **overrides(args)}
    for key in ("sub", "seed", "output", "run_name", "masking_only", "analysis"):
        if key in ov:
            raise MaskSubError(f"compare sets {key!r} itself per setting; drop it (use --settings / --seeds / --out)")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or f"runs/compare-{Path(args.recipe).stem}-{stamp}"
    run_compare(args.recipe, _parse_list(args.settings, "settings"), _parse_list(args.seeds, "seeds", int),
                out, ov, args.budget_ratio, args.analysis)
    return 0
