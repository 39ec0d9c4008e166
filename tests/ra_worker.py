"""Run under torchrun by tests/test_sampler.py: one rank of a repeated-augmentation training run.

Writes this rank's sample order for epochs 0 and 1 (as the trainer's data object gives it) to
OUT/order-RANK.json, then trains the run to the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from masksub.train import config as C
from masksub.train import distributed as D
from masksub.train.data import epoch_order
from masksub.train.engine import Trainer


def main(out: str) -> None:
    cfg = C.load("fashion-mnist", {
        "data": "synthetic", "synthetic_size": 24, "synthetic_val_size": 6, "batch_size": 4, "epochs": 2,
        "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "amp": "none", "progress": False,
        "tensorboard": False, "threads": 1, "repeated_aug": 3, "output": out, "run_name": "ra"})
    t = Trainer(cfg)
    d = t.train_data
    orders = {ep: epoch_order(len(d), d.seed, ep, True, d.rank, d.world, d.repeats).tolist() for ep in (0, 1)}
    Path(out, f"order-{t.dist.rank}.json").write_text(json.dumps(
        {"rank": t.dist.rank, "world": t.dist.world, "orders": orders, "batches": d.num_batches(0)}))
    try:
        t.run()
    finally:
        D.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
