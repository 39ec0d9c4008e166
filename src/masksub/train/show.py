"""``masksub train --recipe NAME --show``: what would run, each value beside the recipe's.

The recipe files carry the published value of every setting with its source in a comment
(tests/test_recipes.py holds them against the sources); this prints the resolved config against
them, marks what an override changed, and says how the lr relates to the run's global batch,
before any GPU time is spent.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from . import config as C


def recipe_lines(name: str) -> dict[str, tuple[Any, str]]:
    """key -> (value as written, the comment on its line) of a recipe file."""
    out: dict[str, tuple[Any, str]] = {}
    for line in C.find_recipe(name).read_text().splitlines():
        if not line or line[0] in " #\t":
            continue
        body, _, comment = line.partition("   # ")
        if ":" not in body:
            continue
        data = yaml.safe_load(body)
        if isinstance(data, dict) and len(data) == 1:
            (key, value), = data.items()
            out[str(key)] = (value, comment.strip())
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    return "null" if v is None else (yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip())


def render(cfg: C.Config, recipe: str | None, world: int | None = None) -> str:
    """The table ``--show`` prints (no recipe, e.g. with ``--resume``: the config as YAML)."""
    from .build import effective_lr

    if not recipe:
        return yaml.safe_dump(cfg.to_dict(), sort_keys=False) + C.describe_sub(cfg) + "\n"

    world = world or int(os.environ.get("WORLD_SIZE", "1") or 1)
    lines = recipe_lines(recipe)
    rows, changed = [], []
    for key, value in cfg.to_dict().items():
        if key in lines:
            pub, src = lines[key]
            same = C._coerce(key, pub, "recipe") == value if key not in ("recipe",) else True
            note = f"# {src}" if src else ""
            if not same:
                changed.append(key)
                note = f"CHANGED: published {_fmt(pub)}" + (f" ({src})" if src else "")
            rows.append((key, _fmt(value), note))
    w = max(len(k) for k, _, _ in rows)
    v = min(max(len(x) for _, x, _ in rows), 40)
    out = [f"recipe {recipe} ({C.find_recipe(recipe)})"]
    out += [f"  {k:<{w}}  {x:<{v}}  {n}".rstrip() for k, x, n in rows]
    out.append(C.describe_sub(cfg))
    lr, wlr, mlr, note = effective_lr(cfg, world)
    batch = cfg.batch_size * world * cfg.accum_steps
    out.append(f"global batch: batch_size {cfg.batch_size} x {world} process(es) (WORLD_SIZE) x accum_steps "
               f"{cfg.accum_steps} = {batch}; the recipe's lr is for {cfg.batch_total or 'an unstated batch'}")
    if world == 1 and cfg.batch_total and batch != cfg.batch_total:
        out.append("  (one process assumed: under torchrun, or with WORLD_SIZE=N set, --show counts N)")
    out.append(f"lr used: {lr:.4g} (warm-up from {wlr:.4g}, min {mlr:.4g})" + (f"; {note}" if note else ""))
    out.append(f"{len(changed)} value(s) differ from the recipe" + (f": {', '.join(changed)}" if changed else "")
               + "; every other key keeps masksub's default (masksub train --list-keys)")
    return "\n".join(out)
