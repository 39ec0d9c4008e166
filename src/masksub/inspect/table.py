"""README's family table: ``masksub inspect`` on a list of common models (``scripts/family_table.py``
writes it; ``tests/test_inspect.py`` checks rows against the report)."""

from __future__ import annotations

from typing import Any

from .report import inspect_model, load_model

# Common models at their published size (random init), with drop-path on so PathSub has rates.
COMMON = ["vit_base_patch16_224", "deit3_small_patch16_224", "eva02_small_patch14_224", "resnet50",
          "convnext_tiny", "swin_tiny_patch4_window7_224", "efficientnet_b0", "focalnet_tiny_srf",
          "mobilenetv3_large_100", "hiera_tiny_224", "cait_xxs24_224", "vit_relpos_small_patch16_224",
          "pit_s_224", "xcit_tiny_12_p16_224", "edgenext_small", "caformer_s18", "beitv2_base_patch16_224"]
BUILD: dict[str, Any] = {"drop_path_rate": 0.1}
START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"
HEADER = ("| model (224 px) | mask family | what the sub-branch does (r=0.5) | mask cost | grad sub/main | "
          "DropSub raises |\n| --- | --- | --- | --- | --- | --- |")


def size_of(name: str) -> int:
    return 224


def row(name: str, measure: bool = True, repeats: int = 1) -> list[str]:
    """The cells of one table row (``measure=False``: cost and ratio cells are '-')."""
    model = load_model(name, num_classes=1000, **BUILD)
    (m,) = inspect_model(model, image_size=size_of(name), batch=2, repeats=repeats, measure=measure, modes=("mask",))
    (d,) = inspect_model(model, image_size=size_of(name), measure=False, modes=("dropout",))
    cost = "-" if m.cost is None else f"{m.cost:.2f}x"
    ratio = "-" if m.grad_ratio is None else f"{m.grad_ratio:.2g}"
    return [f"`{name}`", f"`{m.family}`", m.does, cost, ratio, d.does if d.family else "no dropout"]


def render(rows: list[list[str]]) -> str:
    return "\n".join([HEADER] + ["| " + " | ".join(r) + " |" for r in rows])


def parse(text: str) -> dict[str, list[str]]:
    """The rows of the table between the markers in ``text``, by model name."""
    body = text.split(START, 1)[1].split(END, 1)[0]
    out = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out[cells[0].strip("`")] = cells
    return out
