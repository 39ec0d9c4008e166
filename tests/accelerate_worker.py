"""Run under ``accelerate launch`` (2 CPU processes): MaskSub in an accelerate custom loop,
``backward_fn=accelerator.backward``, both orders; counts DDP all-reduces with a comm hook."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
from comm_count import counting_hook, leave  # noqa: E402
from conftest import tiny_vit  # noqa: E402

from masksub import MaskSub  # noqa: E402


def main(out: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=1000)])
    g = torch.Generator().manual_seed(1 + accelerator.process_index)
    x, y = torch.randn(3, 2, 3, 32, 32, generator=g), torch.randint(0, 5, (3, 2), generator=g)
    res = {"world": accelerator.num_processes}
    for order in ("memory", "fused"):
        torch.manual_seed(0)
        model = tiny_vit(img_size=32, depth=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = accelerator.prepare(model, opt)
        state = {"n": 0}
        model.register_comm_hook(state, counting_hook)
        ms = MaskSub(model, ratio=0.5, order=order)  # on the prepared model: its forward arms DDP
        for i in range(3):
            out_i = ms.backward(x[i], y[i], F.cross_entropy, backward_fn=accelerator.backward)
            opt.step()
            opt.zero_grad()
        w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        ws = [torch.empty_like(w) for _ in range(accelerator.num_processes)]
        dist.all_gather(ws, w)
        res[order] = {"allreduces": state["n"], "same": all(torch.equal(ws[0], v) for v in ws),
                      "loss_sub": float(out_i.loss_sub)}
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
    leave()
