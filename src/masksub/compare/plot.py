"""``masksub plot``: the paper's Figure 2 for any set of runs, one PNG per quantity.

Reads the epoch lines of each run directory's ``metrics.jsonl``; runs are labelled by the
``label`` in their ``config.yaml`` (else the directory name), and seeds of one label are drawn
in one colour.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import MaskSubError

# quantity -> (epoch-line keys, y label, file name)
FIGURES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "accuracy": (("top1",), "validation top-1 (%)", "accuracy.png"),
    "loss_unmasked": (("train_loss_unmasked",), "train loss, no masking (Eq. 1)", "train_loss_unmasked.png"),
    "loss_masked": (("train_loss_masked",), "train loss, 50% masking (Eq. 2)", "train_loss_masked.png"),
    "grad_norm": (("grad_norm_main", "grad_norm_sub"),
                  "gradient norm of each branch's own loss\n(unweighted; mean over micro-batches)", "grad_norm.png"),
}


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's label, seed and epoch lines; a clear error for a directory that is no run."""
    d = Path(run_dir)
    metrics = d / "metrics.jsonl"
    if not metrics.is_file():
        raise MaskSubError(f"{d} is not a run directory (no metrics.jsonl); pass directories written by masksub train")
    epochs = []
    try:
        lines = metrics.read_bytes().splitlines()
    except OSError as e:
        raise MaskSubError(f"cannot read {metrics} ({e.strerror or e})") from None
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if n == len(lines):
                break  # a run killed mid-write leaves a partial last line
            raise MaskSubError(f"{metrics}:{n} has a byte that is not UTF-8 (0x{raw[e.start]:02x} at column "
                               f"{e.start + 1}): the file was damaged. Repair or delete that line") from None
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise MaskSubError(f"{metrics}:{n} is not JSON: the file was damaged. Repair or delete that line") from None
        if isinstance(rec, dict) and rec.get("kind") == "epoch":
            epochs.append(rec)
    label, seed = d.name, None
    conf: dict[str, Any] = {}
    cfg = d / "config.yaml"
    if cfg.is_file():
        import yaml

        conf = yaml.safe_load(cfg.read_text()) or {}
        seed = conf.get("seed")
        label = conf.get("label") or _strip_seed(label, seed)
    from ..train.analysis import curve_names

    curves = curve_names(conf.get("sub", "mask"), bool(conf.get("masking_only")))
    return {"dir": str(d), "label": label, "seed": seed, "epochs": epochs, "curves": curves}


def _strip_seed(name: str, seed: Any) -> str:
    """``masksub-seed1`` -> ``masksub``: seeds of one setting share a colour."""
    suffix = f"-seed{seed}"
    return name[: -len(suffix)] if seed is not None and name.endswith(suffix) else name


def check_out_dir(out: Path, flag: str = "--out", *, create: bool = True) -> None:
    """An output folder that is a file (or sits under one) is refused before anything is written."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        what = "is a file" if p == out else f"is inside {p}, which is a file"
        raise MaskSubError(f"{flag} {out} {what}; give a folder for the results")
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MaskSubError(f"{flag} {out}: cannot create that folder ({e.strerror or e}); give another") from None


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, title: str | None = None) -> list[Path]:
    """Write one PNG per quantity that some run measured; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    if not any(k in e for r in runs for e in r["epochs"] for keys, _, _ in FIGURES.values() for k in keys):
        raise MaskSubError("no epoch metrics to plot in " + ", ".join(map(str, run_dirs)))
    out = Path(out_dir)
    check_out_dir(out)
    labels = list(dict.fromkeys(r["label"] for r in runs))
    colours = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    written = []
    for keys, ylabel, fname in FIGURES.values():
        if not any(k in e for r in runs for e in r["epochs"] for k in keys):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        seen: set[str] = set()
        for r in runs:
            for i, (k, style) in enumerate(zip(keys, ("-", "--"), strict=False)):
                pts = [(e["epoch"], e[k]) for e in r["epochs"] if e.get(k) is not None]
                if not pts:
                    continue
                name = r["label"] + (f": {r['curves'][i] or k}" if len(keys) > 1 else "")  # Figure 2d: what it is
                ax.plot(*zip(*pts, strict=True), style, color=colours[r["label"]], lw=1.6,
                        marker="o" if len(pts) < 12 else None, ms=3,
                        label=None if name in seen else name, alpha=0.9)
                seen.add(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    if not written:
        raise MaskSubError("no epoch metrics to plot in " + ", ".join(map(str, run_dirs)))
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories written by masksub train / compare")
    p.add_argument("--out", default=None, help="folder for the PNG files (default: the first run's parent)")
    p.add_argument("--title", default=None)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out or Path(args.runs[0]).parent)
    check_out_dir(out, create=False)  # before any run is read
    for path in plot_runs(args.runs, out, args.title):
        print(path)
    return 0
