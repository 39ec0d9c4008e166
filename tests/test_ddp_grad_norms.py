"""Per-branch gradient norms under DDP (2 CPU processes, gloo) are those of the synchronized
gradients: equal to one process on the whole batch with the same masks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks
from test_ddp import (  # the same model and masks as the DDP step tests
    CE,
    WORLD,
    half_mask,
    make_model,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from masksub import MaskSub


def data():
    g = torch.Generator().manual_seed(4)
    # rank 1's half differs a lot from rank 0's: local norms are far from the synchronized ones
    x = torch.randn(2, WORLD * 2, 3, 32, 32, generator=g) * torch.tensor([1.0, 1.0, 4.0, 4.0]).view(1, 4, 1, 1, 1)
    y = torch.randint(0, 5, (2, WORLD * 2), generator=g)
    return x, y


def norms(out):
    return float(out.grad_norm_main), float(out.grad_norm_sub)


def worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        x, y = data()
        mine = slice(rank * 2, rank * 2 + 2)
        model = make_model()
        ms = MaskSub(DDP(model), "mask", 0.5, mask_fn=half_mask)
        res = {"step": norms(ms.backward(x[0, mine], y[0, mine], CE, grad_norms=True))}
        model.zero_grad()
        ms.backward(x[0, mine], y[0, mine], CE, sync=False, loss_scale=0.5)
        res["accum_last"] = norms(ms.backward(x[1, mine], y[1, mine], CE, grad_norms=True, loss_scale=0.5))
        res["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        res["accum_first"] = norms(ms.backward(x[0, mine], y[0, mine], CE, sync=False, grad_norms=True,
                                               loss_scale=0.5))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("ddp_norms"))


def test_grad_norms_under_ddp_equal_one_process_on_the_whole_batch(results):
    x, y = data()
    model = make_model()
    ms = MaskSub(model, "mask", 0.5, mask_fn=half_mask)
    step = norms(ms.backward(x[0], y[0], CE, grad_norms=True))
    model.zero_grad()
    ms.backward(x[0], y[0], CE, loss_scale=0.5)
    accum_last = norms(ms.backward(x[1], y[1], CE, grad_norms=True, loss_scale=0.5))
    model.zero_grad()
    accum_first = norms(ms.backward(x[0], y[0], CE, grad_norms=True, loss_scale=0.5))
    for r in results:
        assert r["step"] == pytest.approx(step, rel=1e-4)
        assert r["accum_last"] == pytest.approx(accum_last, rel=1e-4)
        assert r["accum_first"] == pytest.approx(accum_first, rel=1e-4)
    # measuring changes nothing in the gradients themselves
    model2 = make_model()
    ms2 = MaskSub(model2, "mask", 0.5, mask_fn=half_mask)
    ms2.backward(x[0], y[0], CE, loss_scale=0.5)
    ms2.backward(x[1], y[1], CE, loss_scale=0.5)
    ref = {n: p.grad for n, p in model2.named_parameters() if p.grad is not None}
    for r in results:
        for n, g in ref.items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)
