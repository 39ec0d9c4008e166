"""The results table of ``masksub compare``: one row per setting and seed, then the means."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

COLUMNS = ("setting", "seed", "epochs", "final_top1", "best_top1", "time_s", "cost_vs_baseline", "complete")
# A row of a run that stopped before its last epoch says so, and is kept out of the means and the cost.
INCOMPLETE_NOTE = ("Rows with complete = no stopped before their last epoch (max_steps or a stop): their "
                   "accuracy and time are not comparable, and they are left out of the means and the cost.")


def rows_from_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs``: dicts with setting, seed, epochs (epoch lines) and time_s."""
    base_times = [r["time_s"] for r in runs
                  if r["setting"] == "baseline" and r.get("time_s") and r.get("complete", True)]
    base = statistics.mean(base_times) if base_times else None
    rows = []
    for r in runs:
        tops = [e["top1"] for e in r["epochs"] if e.get("top1") is not None]
        rows.append({
            "setting": r["setting"],
            "seed": r["seed"],
            "epochs": len(r["epochs"]),
            "final_top1": tops[-1] if tops else None,
            "best_top1": max(tops) if tops else None,
            "time_s": r.get("time_s"),
            "cost_vs_baseline": (r["time_s"] / base) if (base and r.get("time_s")) else None,
            "complete": "yes" if r.get("complete", True) else "no",
        })
    return rows


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == setting and r.get("complete", "yes") == "yes"]
        if not group:
            continue
        mean: dict[str, Any] = {"setting": setting, "seed": "mean", "epochs": group[0]["epochs"], "complete": "yes"}
        for k in ("final_top1", "best_top1", "time_s", "cost_vs_baseline"):
            vals = [r[k] for r in group if r[k] is not None]
            mean[k] = statistics.mean(vals) if vals else None
        out.append(mean)
    return out


def _fmt(v: Any, k: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}x" if k == "cost_vs_baseline" else (f"{v:.0f}" if k == "time_s" else f"{v:.2f}")
    return str(v)


def to_markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    allrows = rows + mean_rows(rows)
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_fmt(r[k], k) for k in COLUMNS) + " |\n" for r in allrows)
    note = f"\n{INCOMPLETE_NOTE}\n" if any(r.get("complete") == "no" for r in rows) else ""
    return (f"### {title}\n\n" if title else "") + head + body + note


def write_tables(rows: list[dict[str, Any]], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, cs = out / "results.md", out / "results.csv"
    md.write_text(to_markdown(rows, title))
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows + mean_rows(rows):
            w.writerow(r)
    return md, cs
