"""DDP on 2 CPU processes (gloo): one gradient all-reduce per step, counted with a comm hook,
and the same gradients as one process on the full batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks, tiny_vit
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from masksub import MaskSub, MaskSubError

WORLD = 2
CE = nn.CrossEntropyLoss()


def half_mask(model, x, ratio):
    """Deterministic mask (left columns zeroed) so both processes and the reference agree."""
    x = x.clone()
    x[..., : int(x.shape[-1] * ratio)] = 0
    return x


def make_model():
    torch.manual_seed(0)
    return tiny_vit(img_size=32, depth=1)


def data(n_micro=2, per_rank=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_micro, WORLD * per_rank, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (n_micro, WORLD * per_rank), generator=g)
    return x, y


def counting_hook(counter):
    def hook(state, bucket):
        counter.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / WORLD)

    return hook


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        x, y = data()
        mine = slice(rank * 2, rank * 2 + 2)
        res = {}
        for order in ("memory", "fused"):
            model = make_model()
            ddp = DDP(model, bucket_cap_mb=1000)
            calls = []
            ddp.register_comm_hook(None, counting_hook(calls))
            ms = MaskSub(ddp, "mask", 0.5, mask_fn=half_mask, order=order)
            # one step on one micro-batch
            ms.backward(x[0, mine], y[0, mine], CE)
            res[f"{order}_step_calls"] = len(calls)
            res[f"{order}_step_grads"] = grads_of(model)
            # accumulation over two micro-batches
            model.zero_grad()
            calls.clear()
            ms.backward(x[0, mine], y[0, mine], CE, sync=False, loss_scale=0.5)
            res[f"{order}_after_first_micro"] = len(calls)
            ms.backward(x[1, mine], y[1, mine], CE, sync=True, loss_scale=0.5)
            res[f"{order}_accum_calls"] = len(calls)
            res[f"{order}_accum_grads"] = grads_of(model)
        # the real ViT token-removal family, memory order: still one all-reduce per step
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=1000)
        calls = []
        ddp.register_comm_hook(None, counting_hook(calls))
        ms = MaskSub(ddp, "mask", 0.5)
        for _ in range(3):
            model.zero_grad()
            ms.backward(x[0, mine], y[0, mine], CE)
        res["vit_calls_3_steps"] = len(calls)
        # control: two plain backwards through DDP (no no_sync) all-reduce twice
        model.zero_grad()
        calls.clear()
        main = ddp(x[0, mine])
        CE(main, y[0, mine]).backward()
        with ms.sub():
            sub = ddp(x[0, mine])
        CE(sub, y[0, mine]).backward()
        res["naive_calls"] = len(calls)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("ddp"))


def reference(order, micro):
    """One process, the full batch of each micro-batch, mean of micro-batch gradients."""
    x, y = data()
    model = make_model()
    ms = MaskSub(model, "mask", 0.5, mask_fn=half_mask, order=order)
    for i in micro:
        ms.backward(x[i], y[i], CE, loss_scale=1 / len(micro))
    return grads_of(model)


@pytest.mark.parametrize("order", ["memory", "fused"])
def test_one_all_reduce_per_step(ddp_results, order):
    for r in ddp_results:
        assert r[f"{order}_step_calls"] == 1
        assert r[f"{order}_after_first_micro"] == 0
        assert r[f"{order}_accum_calls"] == 1


def test_token_removal_family_one_all_reduce_per_step_and_control(ddp_results):
    for r in ddp_results:
        assert r["vit_calls_3_steps"] == 3
        assert r["naive_calls"] == 2  # the counter sees a second all-reduce when there is one


@pytest.mark.parametrize("order", ["memory", "fused"])
def test_ddp_gradients_equal_single_process(ddp_results, order):
    for key, micro in (("step", [0]), ("accum", [0, 1])):
        ref = reference(order, micro)
        for r in ddp_results:
            got = r[f"{order}_{key}_grads"]
            assert got.keys() == ref.keys()
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=f"{key} {n}")


def test_mask_token_after_ddp_wrap_is_refused(monkeypatch):
    from conftest import tiny_swin

    model = tiny_swin()

    class DistributedDataParallel(nn.Module):  # the unwrap rule goes by the wrapper's name
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = DistributedDataParallel(model)
    with pytest.raises(MaskSubError, match="before wrapping"):
        MaskSub(wrapped, "mask")
    assert not hasattr(model, "masksub_mask_token")
    MaskSub(model, "mask")  # the right order: bare model first, then wrap
    MaskSub(wrapped, "mask")
