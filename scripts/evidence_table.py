"""The CPU-evidence table and plot, from the ``results.json`` of each ``masksub compare`` folder.

    PYTHONPATH=src python scripts/evidence_table.py benchmarks/results/cpu-evidence [--readme README.md]
    PYTHONPATH=src python scripts/evidence_table.py --lengths PILOT_FOLDER [MORE ...] [--readme README.md]

Every sub-folder with a ``results.json`` is one family's comparison. Each setting other than
``baseline`` gets a row: the standard run's and the setting's final top-1 (mean ± sample std over
seeds), the per-seed difference (same seed, same data order), its mean, and the cost (training
time of the setting / the standard run's, measured in the same comparison, wall clock on a
shared machine) and, when ``step_cost.json`` (scripts/step_cost.py) is there, the CPU time of
one step against a standard one. Only complete runs
count; a comparison without ``results.json`` yet (running, or cut short) contributes the runs
it finished. Writes ``table.md`` and ``gain.png`` into the folder; ``--readme`` also replaces the text
between the two ``cpu-evidence`` markers of that file (``--marker NAME``: the ``NAME`` markers).

``--lengths``: how each recipe's length was chosen. The standard run, seed 0, of every comparison
in the folders, one row per recipe and length, with what twice the length gained; a length is
converged when its double gains less than ``CONVERGED`` points. Writes ``lengths.md`` into the
first folder (README markers: ``cpu-evidence lengths``).

With the table, ``diagnostics.md``: what each arm did to the training set, mean over the complete
seeds at the last epoch: the training loss on unmasked images (Eq. 1, the paper's Figure 2b) and
on 50%-masked ones (Eq. 2, Figure 2c), the test loss, and the ratio of the sub-branch's gradient
norm to the main branch's (Figure 2d) at the first and the last epoch (README markers:
``cpu-evidence diagnostics``, replaced when the README has them).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple

CONVERGED = 0.5  # points of test top-1 that twice the length may add to a converged standard run


def markers(name: str = "cpu-evidence") -> tuple[str, str]:
    return f"<!-- {name} table: start -->", f"<!-- {name} table: end -->"


START, END = markers()
NAMES = {"baseline": "standard", "masksub": "MaskSub", "dropsub": "DropSub", "pathsub": "PathSub", "masking": "masking only",
         "samebudget": "standard, same cost"}


def _strength(run: dict[str, Any]) -> str:
    r = (run.get("summary") or {}).get("ratio")
    if r is None:
        return ""
    return {"masksub": f" {r:g}", "dropsub": f" p {r:g}", "pathsub": f" +{r:g}"}.get(run["setting"], f" {r:g}")


class Run(NamedTuple):
    summary: dict[str, Any]
    epochs: list[dict[str, Any]]  # the metrics.jsonl epoch lines
    complete: bool


def _read_run(d: Path) -> Run | None:
    """One run folder; None where it cannot be read."""
    try:
        summary = json.loads((d / "summary.json").read_text())
        lines = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        epochs = int(yaml_value(d / "config.yaml", "epochs"))
    except (OSError, ValueError):
        return None
    complete = not summary.get("stopped") and summary.get("epochs_done") == epochs
    return Run(summary, [e for e in lines if e.get("kind") == "epoch"], complete)


def _read_partial(folder: Path) -> dict[str, Any]:
    """A comparison still running or cut short (no results.json yet): its finished runs, read
    from each run folder's summary.json and metrics.jsonl."""
    plan = json.loads((folder / "compare.json").read_text())
    rows, runs = [], []
    for setting in plan["settings"]:
        for seed in plan["seeds"]:
            run = _read_run(folder / f"{setting}-seed{seed}")
            if run is None:
                continue
            summary, ep, complete = run
            rows.append({"setting": setting, "seed": seed, "epochs": len(ep), "final_top1": summary.get("top1"),
                         "time_s": sum(e.get("time_s") or 0.0 for e in ep), "complete": "yes" if complete else "no"})
            runs.append({"setting": setting, "seed": seed, "summary": summary})
    return {"recipe": plan["recipe"], "settings": plan["settings"], "rows": rows, "runs": runs}


def yaml_value(path: Path, key: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    raise ValueError(f"{key} not in {path}")


def family_rows(folder: Path) -> list[dict[str, Any]]:
    """One dict per non-baseline setting of one comparison folder."""
    done_file = folder / "results.json"
    res = json.loads(done_file.read_text()) if done_file.is_file() else _read_partial(folder)
    done = [r for r in res["rows"] if r.get("complete", "yes") == "yes" and r.get("final_top1") is not None]
    runs = {(r["setting"], r["seed"]): r for r in res.get("runs", [])}
    base = {r["seed"]: r for r in done if r["setting"] == "baseline"}
    out = []
    for setting in [s for s in res["settings"] if s != "baseline"]:
        mine = {r["seed"]: r for r in done if r["setting"] == setting}
        seeds = sorted(set(mine) & set(base))
        if not seeds:
            continue
        deltas = [mine[s]["final_top1"] - base[s]["final_top1"] for s in seeds]
        costs = [mine[s]["time_s"] / base[s]["time_s"] for s in seeds if mine[s].get("time_s") and base[s].get("time_s")]
        run = runs.get((setting, seeds[0]), {"setting": setting})
        out.append({
            "family": folder.name, "recipe": res.get("recipe", ""), "setting": setting,
            "label": NAMES.get(setting, setting) + _strength(run), "seeds": seeds,
            "base": [base[s]["final_top1"] for s in seeds], "mine": [mine[s]["final_top1"] for s in seeds],
            "deltas": deltas, "cost": statistics.mean(costs) if costs else None,
            "epochs": mine[seeds[0]].get("epochs"),
        })
    return out


def merge_seed_folders(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Comparisons run one seed per folder (``NAME-seed1``, ``NAME-seed2``, to run side by side)
    join the row of ``NAME``: one row per family, setting and length."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        fam = re.sub(r"-seed\d+$", "", r["family"])
        key = (fam, r["setting"], r["recipe"], r["epochs"])
        if key not in out:
            out[key] = {**r, "family": fam, "costs": [r["cost"]] * len(r["seeds"]) if r["cost"] else []}
            continue
        m = out[key]
        for k in ("seeds", "base", "mine", "deltas"):
            m[k] = m[k] + r[k]
        m["costs"] += [r["cost"]] * len(r["seeds"]) if r["cost"] else []
        m["cost"] = statistics.mean(m["costs"]) if m["costs"] else None
    for m in out.values():
        order = sorted(range(len(m["seeds"])), key=lambda i: m["seeds"][i])
        for k in ("seeds", "base", "mine", "deltas"):
            m[k] = [m[k][i] for i in order]
    return list(out.values())


DIAG_KEYS = ("unmasked", "masked", "val", "ratio_first", "ratio_last")


def diagnostic_rows(folder: Path) -> list[dict[str, Any]]:
    """One dict per setting of one comparison folder: Figure 2's end-of-run quantities, mean over
    the complete seeds (``None`` where a run did not measure them). Folders of one seed each
    (``NAME-seedN``) join ``NAME``'s row, as in the table: ``diagnostic_rows`` of each, then
    ``merge_diagnostics``."""
    plan = json.loads((folder / "compare.json").read_text())
    out = []
    for setting in plan["settings"]:
        per_seed: dict[str, list[float]] = {k: [] for k in DIAG_KEYS}
        seeds = []
        for seed in plan["seeds"]:
            run = _read_run(folder / f"{setting}-seed{seed}")
            if run is None or not run.complete:
                continue
            ep = run.epochs
            seeds.append(seed)
            for key, name in (("train_loss_unmasked", "unmasked"), ("train_loss_masked", "masked"), ("val_loss", "val")):
                vals = [e[key] for e in ep if e.get(key) is not None]
                if vals:
                    per_seed[name].append(vals[-1])
            ratios = [e["grad_norm_sub"] / e["grad_norm_main"] for e in ep
                      if e.get("grad_norm_sub") is not None and e.get("grad_norm_main")]
            if ratios:
                per_seed["ratio_first"].append(ratios[0])
                per_seed["ratio_last"].append(ratios[-1])
        if seeds:
            out.append({"family": re.sub(r"-seed\d+$", "", folder.name), "recipe": plan["recipe"],
                        "setting": setting, "seeds": seeds, "per_seed": per_seed, **_means(per_seed)})
    return out


def _means(per_seed: dict[str, list[float]]) -> dict[str, float | None]:
    return {k: statistics.mean(v) if v else None for k, v in per_seed.items()}


def merge_diagnostics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (family, setting): the seeds of one-seed folders pooled before the mean."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        m = out.setdefault((r["family"], r["setting"]), {**r, "seeds": [], "per_seed": {k: [] for k in DIAG_KEYS}})
        m["seeds"] = m["seeds"] + r["seeds"]
        m["per_seed"] = {k: m["per_seed"][k] + r["per_seed"][k] for k in DIAG_KEYS}
        m.update(_means(m["per_seed"]))
    return list(out.values())


def diagnostics_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| family | setting | seeds | training loss, unmasked (Eq. 1) | training loss, 50% masked (Eq. 2) | "
            "test loss | gradient norm sub / main, first epoch | ... last epoch |\n|---|---|---|---|---|---|---|---|\n")
    f = lambda v, fmt: "—" if v is None else format(v, fmt)  # noqa: E731
    return head + "".join(
        f"| {r['family']} | {NAMES.get(r['setting'], r['setting'])} | "
        f"{len(r['seeds'])} | {f(r['unmasked'], '.3f')} | {f(r['masked'], '.3f')} | {f(r['val'], '.3f')} | "
        f"{f(r['ratio_first'], '.2f')} | {f(r['ratio_last'], '.2f')} |\n" for r in rows)


def _ms(vals: list[float]) -> str:
    if len(vals) < 2:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def to_markdown(rows: list[dict[str, Any]], step_cost: dict[str, Any] | None = None) -> str:
    """``step_cost``: scripts/step_cost.py's JSON (CPU time per step), a column when given."""
    head = ("| family (recipe) | setting | epochs | seeds | standard top-1 | setting top-1 | "
            "difference per seed | mean difference | training time vs standard | CPU time per step vs standard |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        per_seed = " / ".join(f"{d:+.2f}" for d in r["deltas"])
        cost = f"{r['cost']:.2f}x" if r["cost"] is not None else "—"
        step = ((step_cost or {}).get(r["recipe"]) or {}).get("cost_vs_baseline", {}).get(r["setting"])
        body += (f"| {r['family']} (`{r['recipe']}`) | {r['label']} | {r['epochs']} | "
                 f"{', '.join(map(str, r['seeds']))} | {_ms(r['base'])} | {_ms(r['mine'])} | {per_seed} | "
                 f"{statistics.mean(r['deltas']):+.2f} | {cost} | {f'{step:.2f}x' if step else '—'} |\n")
    return head + body


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1), 3.2))
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["deltas"]), r["deltas"], color="C0", zorder=3, s=18)
        ax.hlines(statistics.mean(r["deltas"]), i - 0.25, i + 0.25, color="C1", zorder=2)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['family']}\n{r['label']}" for r in rows], fontsize=7)
    ax.set_ylabel("top-1 difference vs standard (points)", fontsize=8)
    ax.set_title("Fashion-MNIST, one CPU core: each seed a point, the mean a bar", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def length_rows(roots: list[Path]) -> list[dict[str, Any]]:
    """The complete seed-0 standard run of each (recipe, epochs) under ``roots`` (the first found
    wins), with ``gain_2x``: the same recipe's top-1 at twice the epochs minus this one's."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for root in roots:
        for plan_file in sorted(root.glob("*/compare.json")):
            try:
                recipe = json.loads(plan_file.read_text())["recipe"]
            except (OSError, ValueError, KeyError):
                continue
            run = _read_run(plan_file.parent / "baseline-seed0")
            if run is None or not run.complete or run.summary.get("top1") is None or not run.epochs:
                continue
            summary, ep = run.summary, run.epochs
            epochs = summary["epochs_done"]
            seen.setdefault((recipe, epochs), {
                "recipe": recipe, "epochs": epochs, "steps": summary.get("steps"), "top1": summary["top1"],
                "train_loss": ep[-1].get("loss_main"), "val_loss": ep[-1].get("val_loss"),
                "folder": str(plan_file.parent)})
    rows = sorted(seen.values(), key=lambda r: (r["recipe"], r["epochs"]))
    for r in rows:
        double = seen.get((r["recipe"], 2 * r["epochs"]))
        r["gain_2x"] = double["top1"] - r["top1"] if double else None
    return rows


def lengths_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per recipe and length; the shortest converged length of each recipe in bold."""
    chosen = {}
    for r in rows:
        if r["gain_2x"] is not None and r["gain_2x"] < CONVERGED:
            chosen.setdefault(r["recipe"], r["epochs"])
    head = ("| recipe | epochs | steps | standard top-1 (seed 0) | training loss at the end | test loss at the end | "
            "twice the length adds | converged |\n|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        gain = "—" if r["gain_2x"] is None else f"{r['gain_2x']:+.2f}"
        conv = ("**yes: chosen**" if chosen.get(r["recipe"]) == r["epochs"] else
                "—" if r["gain_2x"] is None else "yes" if r["gain_2x"] < CONVERGED else "no")
        loss = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        body += (f"| `{r['recipe']}` | {r['epochs']} | {r['steps']} | {r['top1']:.2f} | {loss(r['train_loss'])} | "
                 f"{loss(r['val_loss'])} | {gain} | {conv} |\n")
    return head + body


def replace_between(readme: Path, name: str, md: str) -> None:
    start, end = markers(name)
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{start}\n{md}{end}{tail}")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    argv = list(argv)
    readme = marker = None
    if "--readme" in argv:
        i = argv.index("--readme")
        readme = Path(argv[i + 1])
        del argv[i:i + 2]
    if "--marker" in argv:
        i = argv.index("--marker")
        marker = argv[i + 1]
        del argv[i:i + 2]
    if "--lengths" in argv:
        argv.remove("--lengths")
        roots = [Path(a) for a in argv]
        lrows = length_rows(roots)
        if not lrows:
            print(f"no complete standard run (*/baseline-seed0) under {', '.join(argv)}", file=sys.stderr)
            return 2
        md = lengths_markdown(lrows)
        (roots[0] / "lengths.md").write_text(md)
        if readme is not None:
            replace_between(readme, marker or "cpu-evidence lengths", md)
        print(md, end="")
        print(f"wrote {roots[0] / 'lengths.md'}")
        return 0
    root = Path(argv[0])
    found = {p.parent for p in root.glob("*/results.json")} | {p.parent for p in root.glob("*/compare.json")}
    folders = sorted(found, key=lambda f: (f.name.startswith("longer"), f.name))  # the checks last
    if not folders:
        print(f"no comparison (*/results.json or */compare.json) under {root}", file=sys.stderr)
        return 2
    rows = merge_seed_folders([row for f in folders for row in family_rows(f)])
    rows.sort(key=lambda r: (r["family"].startswith("longer"), r["recipe"], r["epochs"] or 0))  # stable
    cost_file = root / "step_cost.json"
    md = to_markdown(rows, json.loads(cost_file.read_text()) if cost_file.is_file() else None)
    (root / "table.md").write_text(md)
    plot(rows, root / "gain.png")
    diag = diagnostics_markdown(merge_diagnostics(
        [r for f in folders if (f / "compare.json").is_file() for r in diagnostic_rows(f)]))
    (root / "diagnostics.md").write_text(diag)
    if readme is not None:
        replace_between(readme, marker or "cpu-evidence", md)
        if markers("cpu-evidence diagnostics")[0] in readme.read_text():
            replace_between(readme, "cpu-evidence diagnostics", diag)
    print(md, end="")
    print(diag, end="")
    print(f"wrote {root / 'table.md'}, {root / 'diagnostics.md'} and {root / 'gain.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
