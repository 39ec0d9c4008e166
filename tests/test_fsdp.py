"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo): the MaskSub step's gradients equal one
process's, and it reduce-scatters as often per step as a plain step (counted, not assumed).

The reference is one process running the same two half-batches with the same seeds (so the
masks of the real families, token removal, mask token and pixel squares, are drawn alike) and
averaging their gradients: what data parallelism computes, BatchNorm's per-rank statistics
included.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks, tiny_resnet, tiny_swin, tiny_vit
from torch import nn

from masksub import MaskSub, MaskSubError

WORLD = 2
PER_RANK = 2
CE = nn.CrossEntropyLoss()
MODELS = {"vit": lambda: tiny_vit(img_size=32, depth=2), "swin": lambda: tiny_swin(),
          "resnet": lambda: tiny_resnet()}
SIZE = {"vit": 32, "swin": 64, "resnet": 64}


def make(name):
    torch.manual_seed(0)
    return MODELS[name]()


def data(name, n_micro=2):
    g = torch.Generator().manual_seed(1)
    s = SIZE[name]
    x = torch.randn(n_micro, WORLD * PER_RANK, 3, s, s, generator=g)
    y = torch.randint(0, 5, (n_micro, WORLD * PER_RANK), generator=g)
    return x, y


class Counter:
    """Counts the reduce-scatters FSDP2 issues (``dist.reduce_scatter_single`` in torch 2.14,
    ``reduce_scatter_tensor`` in others) and the all-reduces (none expected: no HSDP)."""

    def __init__(self):
        self.n = {"reduce_scatter": 0, "all_reduce": 0}
        self._orig = {}

    def __enter__(self):
        for fn, kind in (("reduce_scatter_single", "reduce_scatter"), ("reduce_scatter_tensor", "reduce_scatter"),
                         ("all_reduce", "all_reduce")):
            if hasattr(dist, fn):
                orig = self._orig[fn] = getattr(dist, fn)

                def wrapped(*a, _orig=orig, _kind=kind, **k):
                    self.n[_kind] += 1
                    return _orig(*a, **k)

                setattr(dist, fn, wrapped)
        return self

    def __exit__(self, *exc):
        for fn, orig in self._orig.items():
            setattr(dist, fn, orig)

    def take(self):
        out = dict(self.n)
        self.n = dict.fromkeys(self.n, 0)
        return out


def full_grads(model):
    """Unsharded gradients (a collective: every rank calls it in the same order)."""
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def worker(rank, init_method, out_dir):
    from masksub.train.fsdp import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    res = {}
    try:
        with Counter() as c:
            for name in MODELS:
                x, y = data(name)
                for order in ("memory", "fused", "plain"):
                    model = make(name)
                    ms = MaskSub(model, None if order == "plain" else "mask", 0.5 if order != "plain" else None,
                                 order="memory" if order == "plain" else order)
                    shard_model(model)
                    c.take()
                    torch.manual_seed(100 + rank)
                    ms.backward(x[0, mine], y[0, mine], CE)
                    res[f"{name}_{order}_comm"] = c.take()
                    res[f"{name}_{order}_grads"] = full_grads(model)
                    res[f"{name}_{order}_n_units"] = sum(hasattr(m, "set_requires_gradient_sync")
                                                         for m in model.modules())
                    if order != "memory":
                        continue
                    # accumulation: sync=False keeps every reduce-scatter for the last micro-batch
                    model.zero_grad()
                    c.take()
                    torch.manual_seed(200 + rank)
                    ms.backward(x[0, mine], y[0, mine], CE, sync=False, loss_scale=0.5)
                    res[f"{name}_accum_first"] = c.take()
                    ms.backward(x[1, mine], y[1, mine], CE, sync=True, loss_scale=0.5)
                    res[f"{name}_accum_last"] = c.take()
                    res[f"{name}_accum_grads"] = full_grads(model)
                    # control: two backwards without the sync switch reduce-scatter twice
                    model.zero_grad()
                    c.take()
                    CE(model(x[0, mine]), y[0, mine]).backward()
                    with ms.sub():
                        out = model(x[0, mine])
                    CE(out, y[0, mine]).backward()
                    res[f"{name}_naive_comm"] = c.take()
                    # per-branch gradient norms (Figure 2d): measurable under FSDP, same gradients
                    model.zero_grad()
                    torch.manual_seed(100 + rank)
                    out = ms.backward(x[0, mine], y[0, mine], CE, grad_norms=True)
                    res[f"{name}_norms_comm"] = c.take()
                    res[f"{name}_norms"] = (float(out.grad_norm_main), float(out.grad_norm_sub))
                    res[f"{name}_norms_grads"] = full_grads(model)
                    # sync_main: the main backward reduce-scatters too (no unsharded gradient held)
                    model.zero_grad()
                    ms.sync_main = True
                    torch.manual_seed(100 + rank)
                    ms.backward(x[0, mine], y[0, mine], CE)
                    ms.sync_main = False
                    res[f"{name}_sync_main_comm"] = c.take()
                    res[f"{name}_sync_main_grads"] = full_grads(model)
                    # and an optimizer step on the sharded parameters, clipping included
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
            # the trainer's options: bf16 gathers with fp32 reduction; activation checkpointing
            x, y = data("vit")
            for opt in ("bf16", "ckpt"):
                model = make("vit")
                ms = MaskSub(model, "mask", 0.5)
                shard_model(model, amp="bf16" if opt == "bf16" else "none", activation_checkpointing=opt == "ckpt")
                seen = []
                model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a, _s=seen: _s.append(m.weight.dtype))
                c.take()
                torch.manual_seed(100 + rank)
                ms.backward(x[0, mine], y[0, mine], CE)
                res[f"{opt}_comm"] = c.take()
                res[f"{opt}_compute_dtypes"] = set(seen)
                res[f"{opt}_block_forwards"] = len(seen)
                res[f"{opt}_grad_dtypes"] = {p.grad.dtype for p in model.parameters() if p.grad is not None}
                res[f"{opt}_grads"] = full_grads(model)
            # a mask token added after sharding is refused, and nothing is left behind
            model = make("swin")
            shard_model(model)
            try:
                MaskSub(model, "mask")
                res["late_token"] = "accepted"
            except MaskSubError as e:
                res["late_token"] = str(e)
            res["late_token_left"] = hasattr(model, "masksub_mask_token")
            import masksub

            try:
                masksub.prepare(model, "mask")
                res["late_prepare"] = "accepted"
            except MaskSubError as e:
                res["late_prepare"] = str(e)
            res["late_prepare_left"] = hasattr(model, "masksub_mask_token")
            res["late_family"] = MaskSub(model, "dropout").branch.name  # detection sees Swin through FSDP
            from masksub.branches import detect_family

            res["swin_family_sharded"] = detect_family(model).name
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return spawn_ranks(worker, WORLD, tmp_path_factory.mktemp("fsdp"))


def reference(name, order, micro, seed):
    """One process: each rank's half of each micro-batch with that rank's seed, averaged."""
    x, y = data(name)
    model = make(name)
    ms = MaskSub(model, None if order == "plain" else "mask", 0.5 if order != "plain" else None,
                 order="memory" if order == "plain" else order)
    for r in range(WORLD):
        torch.manual_seed(seed + r)
        for i in micro:
            half = slice(r * PER_RANK, (r + 1) * PER_RANK)
            ms.backward(x[i, half], y[i, half], CE, loss_scale=1 / (WORLD * len(micro)))
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("order", ["memory", "fused", "plain"])
def test_fsdp_gradients_equal_single_process(fsdp_results, name, order):
    ref = reference(name, order, [0], 100)
    for r in fsdp_results:
        got = r[f"{name}_{order}_grads"]
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=f"{name} {order} {n}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_fsdp_accumulation_gradients_equal_single_process(fsdp_results, name):
    # micro-batch 0 with seed 200 + r, then micro-batch 1 continuing the same stream
    x, y = data(name)
    model = make(name)
    ms = MaskSub(model, "mask", 0.5)
    for r in range(WORLD):
        torch.manual_seed(200 + r)
        half = slice(r * PER_RANK, (r + 1) * PER_RANK)
        for i in (0, 1):
            ms.backward(x[i, half], y[i, half], CE, loss_scale=1 / (2 * WORLD))
    for res in fsdp_results:
        got = res[f"{name}_accum_grads"]
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {n}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_fsdp_reduce_scatters_per_step_equal_plain(fsdp_results, name):
    for r in fsdp_results:
        plain = r[f"{name}_plain_comm"]["reduce_scatter"]
        units = r[f"{name}_plain_n_units"]
        assert plain == units >= 1  # one per sharded unit: the counter sees FSDP's collectives
        if name != "resnet":
            assert units > 1  # transformers are sharded per block
        assert r[f"{name}_memory_comm"]["reduce_scatter"] == plain
        assert r[f"{name}_fused_comm"]["reduce_scatter"] == plain
        assert r[f"{name}_memory_comm"]["all_reduce"] == r[f"{name}_plain_comm"]["all_reduce"]
        assert r[f"{name}_accum_first"]["reduce_scatter"] == 0
        assert r[f"{name}_accum_last"]["reduce_scatter"] == plain
        assert r[f"{name}_naive_comm"]["reduce_scatter"] == 2 * plain  # control: the counter sees a second one


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_fsdp_grad_norms_equal_single_process(fsdp_results, name):
    total = reference(name, "memory", [0], 100)
    main = reference(name, "plain", [0], 100)  # the main branch's part: (1/2) x the plain gradient
    ref_main = torch.nn.utils.get_total_norm([0.5 * g for g in main.values()])
    ref_sub = torch.nn.utils.get_total_norm([g - 0.5 * main[n] if n in main else g for n, g in total.items()])
    for r in fsdp_results:
        gm, gs = r[f"{name}_norms"]
        assert gm == pytest.approx(float(ref_main), rel=1e-4)
        assert gs == pytest.approx(float(ref_sub), rel=1e-4)
        for n, g in total.items():  # measuring (or syncing the main part) changes nothing in the result
            torch.testing.assert_close(r[f"{name}_norms_grads"][n], g, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(r[f"{name}_sync_main_grads"][n], g, rtol=1e-4, atol=1e-6)
        assert r[f"{name}_sync_main_comm"]["reduce_scatter"] == 2 * r[f"{name}_plain_comm"]["reduce_scatter"]
        # the measured steps sync the main part first: one extra reduce-scatter per unit there
        assert r[f"{name}_norms_comm"]["reduce_scatter"] == 2 * r[f"{name}_plain_comm"]["reduce_scatter"]


@pytest.mark.slow
def test_fsdp_bf16_policy_and_activation_checkpointing(fsdp_results):
    for r in fsdp_results:
        plain = r["vit_plain_comm"]["reduce_scatter"]
        assert r["bf16_compute_dtypes"] == {torch.bfloat16}  # gathered and computed in bf16
        assert r["bf16_grad_dtypes"] == {torch.float32}  # reduced into fp32 shards
        assert r["bf16_comm"]["reduce_scatter"] == r["ckpt_comm"]["reduce_scatter"] == plain
        assert r["ckpt_compute_dtypes"] == {torch.float32} and len(r["ckpt_grads"]) == len(r["vit_memory_grads"])
        assert r["ckpt_block_forwards"] == 2 * r["bf16_block_forwards"] == 4  # main, sub, each recomputed
        for n, g in r["vit_memory_grads"].items():  # recomputing blocks changes nothing
            torch.testing.assert_close(r["ckpt_grads"][n], g, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(r["bf16_grads"][n], g, rtol=0.1, atol=2e-2)


@pytest.mark.slow
def test_fsdp_late_mask_token_refused_and_family_detected(fsdp_results):
    for r in fsdp_results:
        assert "before fully_shard" in r["late_token"]
        assert r["late_token_left"] is False
        assert "before fully_shard" in r["late_prepare"] and r["late_prepare_left"] is False
        assert r["swin_family_sharded"] == "swin"
        assert r["late_family"] == "dropout"
