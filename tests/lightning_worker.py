"""Run under torchrun (2 CPU processes): Lightning strategy="ddp" with LightningMaskSub, automatic
and manual optimization; counts DDP all-reduces with a comm hook and writes them (rank 0)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from comm_count import counting_hook, leave  # noqa: E402
from test_lightning import Lit, data_loader  # noqa: E402


def main(out: str) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    res = {}
    for manual in (False, True):
        state = {"n": 0}
        strategy = DDPStrategy(process_group_backend="gloo", bucket_cap_mb=1000)

        class Count(pl.Callback):  # Lightning registers comm hooks on CUDA only: register it here
            def on_train_start(self, trainer, module, state=state):
                trainer.strategy.model.register_comm_hook(state, counting_hook)

        torch.manual_seed(0)
        lit = Lit(manual=manual)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[Count()])
        trainer.fit(lit, data_loader(shuffle=False))
        w = torch.cat([p.detach().reshape(-1) for p in lit.parameters()])
        ws = [torch.empty_like(w) for _ in range(dist.get_world_size())]
        dist.all_gather(ws, w)
        res["manual" if manual else "automatic"] = {"allreduces": state["n"], "steps": trainer.global_step,
                                                    "same": all(torch.equal(ws[0], x) for x in ws)}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
    leave()
