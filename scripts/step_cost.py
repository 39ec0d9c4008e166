"""CPU time of one training step, standard vs each sub-branch setting, for the CPU-evidence recipes.

    PYTHONPATH=src python scripts/step_cost.py OUT.json [--steps N] fmnist-cpu-vit:masksub,dropsub,pathsub ...

The wall-clock cost in a comparison's table is the ratio of training times measured while other
work shared the machine; this measures the step itself: ``time.process_time`` of this one-thread
process (what the CPU spent on it, not the time it waited), the settings interleaved step by
step, the median over ``--steps`` steps. Same model, batch, optimizer for every setting.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from masksub import MaskSub
from masksub.train import config as C
from masksub.train.build import build_model, build_optimizer

SETTING_SUB = {"baseline": "none", "masksub": "mask", "dropsub": "dropout", "pathsub": "droppath"}


def measure(recipe: str, settings: list[str], steps: int = 20) -> dict[str, float]:
    """setting -> median CPU seconds per step (``baseline`` always included)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = C.load(recipe, {"data": "synthetic"})
    model = build_model(cfg, pretrained=False).train()
    opt = build_optimizer(cfg, model)
    names = ["baseline", *[s for s in settings if s != "baseline"]]
    steppers = {}
    for s in names:
        c = C.load(recipe, {"data": "synthetic", "sub": SETTING_SUB[s]})
        mode = None if c.sub == "none" else c.sub
        steppers[s] = MaskSub(model, mode, C.sub_strength(c) if mode else None, family=c.family,
                              **(c.family_options if mode else {}))
    x = torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,))
    times: dict[str, list[float]] = {s: [] for s in names}
    for i in range(steps + 2):  # two warm-up rounds
        for s in names:
            t0 = time.process_time()
            opt.zero_grad(set_to_none=True)
            steppers[s].backward(x, y, F.cross_entropy)
            opt.step()
            if i >= 2:
                times[s].append(time.process_time() - t0)
    return {s: statistics.median(v) for s, v in times.items()}


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    steps = 20
    rest = argv[1:]
    if "--steps" in rest:
        i = rest.index("--steps")
        steps = int(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
    result = {}
    for item in rest:
        recipe, _, settings = item.partition(":")
        med = measure(recipe, settings.split(",") if settings else ["masksub"], steps)
        result[recipe] = {"cpu_s_per_step": med, "cost_vs_baseline": {s: v / med["baseline"] for s, v in med.items()},
                          "steps": steps}
        print(recipe, {s: f"{v / med['baseline']:.2f}x" for s, v in med.items()}, flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
