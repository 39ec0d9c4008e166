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


PLAN = "compare.json"  # what a comparison was asked to do: `--resume` reads it back


def run_compare(recipe: str, settings: list[str], seeds: list[int], out_dir: str | Path,
                overrides: dict[str, Any] | None = None, budget_ratio: float | None = None,
                analysis: bool = True, *, resume: bool = False) -> dict[str, Any]:
    """Train every (setting, seed); returns the results dict also written to results.json.

    A signal stops the whole comparison (no table is written); ``resume=True`` keeps the finished
    runs, resumes the interrupted one from its checkpoint and trains the rest."""
    from ..train import config as C
    from ..train.engine import train
    from .plot import check_out_dir, plot_runs, read_run
    from .table import rows_from_runs, write_tables

    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise MaskSubError(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    if "samebudget" in settings and budget_ratio is None and not {"baseline", "masksub"} <= set(settings):
        raise MaskSubError("samebudget needs baseline and masksub in --settings (to measure the cost) or --budget-ratio")
    overrides = dict(overrides or {})
    base_cfg = C.load(recipe, overrides)  # every bad key / value fails here, before any training
    out = Path(out_dir)
    created = not out.exists()
    check_out_dir(out, "--out")
    order = [s for s in settings if s != "samebudget"] + (["samebudget"] if "samebudget" in settings else [])
    plan = {"recipe": recipe, "settings": settings, "seeds": seeds, "overrides": overrides,
            "budget_ratio": budget_ratio, "analysis": analysis, "config": base_cfg.to_dict(), "configs": {}}
    if resume:
        plan = _check_unchanged(out, recipe, overrides, order, seeds, analysis, base_cfg)
    else:
        if (out / PLAN).exists():
            raise MaskSubError(f"{out} already holds a comparison; continue it with: masksub compare --resume "
                               f"{out}, or pick another --out")
        _write_plan(out, plan)
    runs: list[dict[str, Any]] = []
    try:
        for setting in order:
            for seed in seeds:
                ov = {**overrides, **SETTINGS[setting], "seed": seed, "output": str(out),
                      "run_name": f"{setting}-seed{seed}", "analysis": analysis}
                if setting == "samebudget":
                    ratio = budget_ratio if budget_ratio is not None else _measured_cost(runs)
                    ov["epochs"] = max(1, math.ceil(base_cfg.epochs * ratio - 1e-9))
                    ov["warmup_epochs"] = base_cfg.warmup_epochs
                cfg = C.load(recipe, ov)
                run_dir = out / ov["run_name"]
                if plan["configs"].get(ov["run_name"]) != cfg.to_dict():  # what this run trains with, for --resume
                    plan["configs"][ov["run_name"]] = cfg.to_dict()
                    _write_plan(out, plan)
                summary = _finished(run_dir, cfg.epochs) if resume else None
                if summary is not None:
                    print(f"== compare: {setting}, seed {seed}: finished before, kept ==", flush=True)
                else:
                    print(f"== compare: {setting}, seed {seed}: {cfg.epochs} epochs ==", flush=True)
                    summary = _train_or_resume(train, cfg, run_dir, resume)
                if summary.get("stopped") == "signal":
                    sig = summary.get("signal") or 15
                    print(f"compare: stopped by signal {sig} during {setting}, seed {seed}; no table written. "
                          f"Finished runs are kept; continue with: masksub compare --resume {out}", flush=True)
                    return {"stopped": "signal", "signal": sig, "out": str(out)}
                run = read_run(run_dir)
                # training time only (epoch lines), not evaluation or the analysis passes
                train_s = sum(e.get("time_s") or 0.0 for e in run["epochs"]) or summary.get("time_s")
                runs.append({"setting": setting, "seed": seed, "dir": run["dir"], "epochs": run["epochs"],
                             "time_s": train_s, "summary": summary,
                             "complete": summary.get("epochs_done") == cfg.epochs and not summary.get("stopped")})
    except MaskSubError:
        if not resume and not any((out / f"{st}-seed{sd}").exists() for st in order for sd in seeds):
            _undo(out, created)  # refused before any run started: nothing left that blocks a rerun
        raise
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


def _undo(out: Path, created: bool) -> None:
    (out / PLAN).unlink(missing_ok=True)
    if created:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def _write_plan(out: Path, plan: dict[str, Any]) -> None:
    """compare.json, replaced whole (a reader never sees half of it)."""
    tmp = out / f".{PLAN}.tmp"
    tmp.write_text(json.dumps(plan, indent=2, default=str) + "\n")
    tmp.replace(out / PLAN)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key (old -> new)`` for each setting that differs; a key the recorded config predates
    counts as its default."""
    from ..train.config import Config

    defaults = Config().to_dict()
    return [f"{k} ({old.get(k, defaults.get(k))!r} -> {v!r})" for k, v in new.items() if old.get(k, defaults.get(k)) != v]


def _check_unchanged(out: Path, recipe: str, overrides: dict[str, Any], order: list[str], seeds: list[int],
                     analysis: bool, base_cfg: Any) -> dict[str, Any]:
    """``--resume``: every run must train with the config the comparison started with; a recipe
    edited since then would put runs of two configs in one table. Checked before any training."""
    from ..train import config as C

    plan = json.loads((out / PLAN).read_text())
    plan.setdefault("configs", {})
    recorded: dict[str, dict[str, Any]] = {}
    if "config" in plan:
        recorded["the comparison"] = plan["config"]
    current = {"the comparison": base_cfg.to_dict()}
    for setting in order:
        if setting == "samebudget":  # its epochs come from the measured cost
            continue
        for seed in seeds:
            name = f"{setting}-seed{seed}"
            saved = plan["configs"].get(name)
            if saved is None and (out / name / "config.yaml").is_file():
                import yaml

                saved = yaml.safe_load((out / name / "config.yaml").read_text())
            if saved is not None:
                recorded[name] = saved
                ov = {**overrides, **SETTINGS[setting], "seed": seed, "output": str(out), "run_name": name,
                      "analysis": analysis}
                current[name] = C.load(recipe, ov).to_dict()
    for name, saved in recorded.items():
        changed = config_changes(saved, current[name])
        if changed:
            raise MaskSubError(
                f"the recipe {recipe} changed since {name} started: {', '.join(changed[:6])}"
                f"{' ...' if len(changed) > 6 else ''}; a resumed comparison would put runs of two configs in one "
                f"table. Restore those values, or start a new comparison (another --out)")
    return plan


def _finished(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The summary of a run that trained all its epochs, else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = not summary.get("stopped") and summary.get("epochs_done") == epochs
    return summary if done else None


def _train_or_resume(train: Any, cfg: Any, run_dir: Path, resume: bool) -> dict[str, Any]:
    """On --resume: a run with a checkpoint continues from it; one stopped before its first
    checkpoint starts again."""
    if resume and (run_dir / "last.pt").is_file():
        return train(cfg, resume=str(run_dir))
    return train(cfg, overwrite=resume)


def _measured_cost(runs: list[dict[str, Any]]) -> float:
    def mean_time(setting: str) -> float:
        ts = [r["time_s"] for r in runs if r["setting"] == setting and r["time_s"] and r.get("complete", True)]
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

    if args.resume:
        return _resume(args)
    if not args.recipe:
        raise MaskSubError("give --recipe NAME (see `masksub train --list`)")
    ov = {**(QUICK if args.quick else {}), **overrides(args)}
    for key in ("sub", "seed", "output", "run_name", "masking_only", "analysis"):
        if key in ov:
            raise MaskSubError(f"compare sets {key!r} itself per setting; drop it (use --settings / --seeds / --out)")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or f"runs/compare-{Path(args.recipe).stem}-{stamp}"
    res = run_compare(args.recipe, _parse_list(args.settings, "settings"), _parse_list(args.seeds, "seeds", int),
                      out, ov, args.budget_ratio, args.analysis)
    return 128 + int(res["signal"]) if res.get("stopped") == "signal" else 0


def _resume(args: argparse.Namespace) -> int:
    """``masksub compare --resume DIR``: the same plan, from where it stopped."""
    from ..train.cli_train import overrides

    out = Path(args.resume)
    try:
        plan = json.loads((out / PLAN).read_text())
    except (OSError, ValueError):
        raise MaskSubError(f"{out} is not a comparison folder (no readable {PLAN}); give the --out folder of "
                           "a masksub compare run") from None
    if overrides(args) or args.recipe or args.quick or args.budget_ratio is not None:
        raise MaskSubError("compare --resume continues the comparison as it was asked (its compare.json); "
                           "drop the other options")
    res = run_compare(plan["recipe"], plan["settings"], plan["seeds"], out, plan["overrides"],
                      plan["budget_ratio"], plan["analysis"], resume=True)
    return 128 + int(res["signal"]) if res.get("stopped") == "signal" else 0
