"""MaskSub.backward: both orders, main branch untouched, AMP, GradScaler, clipping, accumulation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_resnet, tiny_swin, tiny_vit
from torch import nn

from masksub import MaskSub, relaxed_loss

CE = nn.CrossEntropyLoss()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_step(make, order, seed=0, **kw):
    torch.manual_seed(123)
    model = make()
    ms = MaskSub(model, order=order, **kw)
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 64, 64)
    y = torch.randint(0, 5, (4,))
    out = ms.backward(x, y, CE)
    return grads(model), out


CASES = {
    "vit_droppath": (lambda: tiny_vit(img_size=64, depth=2, drop_path_rate=0.3, drop_rate=0.1),
                     dict(mode="mask", ratio=0.5)),
    "vit_pathsub": (lambda: tiny_vit(img_size=64, depth=2, drop_path_rate=0.3), dict(mode="droppath")),
    "vit_dropsub": (lambda: tiny_vit(img_size=64, drop_rate=0.1), dict(mode="dropout")),
    "swin_token": (lambda: tiny_swin(drop_path_rate=0.2), dict(mode="mask", ratio=0.5)),
    "resnet_pixel": (lambda: tiny_resnet(drop_path_rate=0.2), dict(mode="mask", ratio=0.5, patch_size=16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_memory_and_fused_orders_give_equal_gradients(case):
    make, kw = CASES[case]
    g_mem, out_mem = run_step(make, "memory", **kw)
    g_fused, out_fused = run_step(make, "fused", **kw)
    assert g_mem.keys() == g_fused.keys() and len(g_mem) > 0
    for n in g_mem:
        torch.testing.assert_close(g_mem[n], g_fused[n], rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(out_mem.loss_sub, out_fused.loss_sub)
    # a different seed draws other masks / drop paths: the test can see a difference
    g_other, _ = run_step(make, "memory", seed=1, **kw)
    assert any(not torch.allclose(g_mem[n], g_other[n]) for n in g_mem)


@pytest.mark.parametrize("mode", ["mask", "dropout", "droppath"])
def test_main_forward_bit_identical_to_plain_model(mode):
    torch.manual_seed(5)
    model = tiny_vit(img_size=64, depth=2, drop_path_rate=0.2, drop_rate=0.1)
    x = torch.randn(3, 3, 64, 64)
    torch.manual_seed(7)
    plain = model(x)
    ms = MaskSub(model, mode)
    torch.manual_seed(7)
    assert torch.equal(ms.forward_main(x), plain)
    torch.manual_seed(7)
    out = ms.backward(x, torch.tensor([0, 1, 2]), CE)
    assert torch.equal(out.main_logits, plain.detach())
    assert not torch.equal(out.sub_logits, out.main_logits)


def test_mode_none_is_the_plain_step():
    torch.manual_seed(0)
    model = tiny_vit(img_size=32, drop_path_rate=0.1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    torch.manual_seed(1)
    CE(model(x), y).backward()
    ref = grads(model)
    model.zero_grad()
    torch.manual_seed(1)
    out = MaskSub(model, None).backward(x, y, CE)
    assert out.loss_sub is None and torch.equal(out.loss, out.loss_main)
    for n, g in grads(model).items():
        assert torch.equal(g, ref[n]), n


def test_bf16_autocast():
    model = tiny_vit(img_size=32)
    ms = MaskSub(model, "mask", 0.5, amp_dtype=torch.bfloat16)
    out = ms.backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), CE)
    assert out.main_logits.dtype == torch.bfloat16
    assert out.loss_sub.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.grad is not None)


def test_grad_scaler_and_single_clip_on_the_sum():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    if not scaler.is_enabled():
        pytest.skip("GradScaler is not usable on the CPU in this torch")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    def fresh():
        torch.manual_seed(0)
        return tiny_vit(img_size=32)

    model = fresh()
    torch.manual_seed(1)
    MaskSub(model, "mask", 0.5).backward(x, y, CE)
    ref = grads(model)

    model = fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ms = MaskSub(model, "mask", 0.5)
    torch.manual_seed(1)
    out = ms.backward(x, y, CE, scaler=scaler, grad_norms=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n] * 256.0, msg=n)
    scaler.unscale_(opt)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref.values()]))
    torch.testing.assert_close(total, want)
    # per-branch norms come out unscaled too, and the two parts make up the sum
    assert out.grad_norm_main > 0 and out.grad_norm_sub > 0
    assert out.grad_norm_main + out.grad_norm_sub >= total * (1 - 1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_grad_norms_per_branch_match_hand_split():
    torch.manual_seed(0)
    model = tiny_vit(img_size=32, depth=2, drop_path_rate=0.2)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 4])
    ms = MaskSub(model, "mask", 0.5)
    torch.manual_seed(9)
    out = ms.backward(x, y, CE, grad_norms=True)

    model.zero_grad()
    torch.manual_seed(9)
    main = model(x)
    (CE(main, y) * 0.5).backward()
    g_main = grads(model)
    with ms.sub():
        sub = model(x)
    (relaxed_loss(sub, main) * 0.5).backward()
    g_sub = {n: g - g_main.get(n, 0) for n, g in grads(model).items()}

    def norm(d):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in d.values()]))

    torch.testing.assert_close(out.grad_norm_main, norm(g_main))
    torch.testing.assert_close(out.grad_norm_sub, norm(g_sub), rtol=1e-4, atol=1e-6)


def test_accumulation_with_loss_scale_sums_micro_batches():
    torch.manual_seed(0)
    model = tiny_vit(img_size=32, drop_path_rate=0.1)
    ms = MaskSub(model, "mask", 0.5)
    xs = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    ys = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    torch.manual_seed(4)
    ms.backward(xs[0], ys[0], CE, sync=False, loss_scale=0.5)
    ms.backward(xs[1], ys[1], CE, sync=True, loss_scale=0.5)
    acc = grads(model)
    parts = []
    torch.manual_seed(4)
    for x, y in zip(xs, ys, strict=True):
        model.zero_grad()
        ms.backward(x, y, CE)
        parts.append(grads(model))
    for n, g in acc.items():
        torch.testing.assert_close(g, (parts[0][n] + parts[1][n]) / 2, msg=n)


def test_dict_input_and_forward_fn():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.drop = nn.Dropout(0.0)

        def forward(self, feats):
            return {"out": self.fc(self.drop(feats))}

    model = DictNet()
    ms = MaskSub(model, "dropout", 0.5, forward_fn=lambda m, x: m(x["feats"])["out"])
    out = ms.backward({"feats": torch.randn(5, 4)}, torch.randint(0, 3, (5,)), CE)
    assert out.main_logits.shape == (5, 3) and model.fc.weight.grad is not None


class NoSync(Exception):
    pass


def test_backward_adds_no_host_sync(monkeypatch):
    """``.item()``, ``float()``, ``bool()`` on a tensor wait for the device: none in a step."""
    model = tiny_vit(img_size=32, depth=2, drop_path_rate=0.1)
    cases = [
        (model, MaskSub(model, "mask", 0.5), torch.randn(2, 3, 32, 32)),
        (model, MaskSub(model, "droppath"), torch.randn(2, 3, 32, 32)),
    ]
    res = tiny_resnet()
    cases.append((res, MaskSub(res, "mask", 0.5, patch_size=16), torch.randn(2, 3, 32, 32)))
    sw = tiny_swin()
    cases.append((sw, MaskSub(sw, "mask", 0.5), torch.randn(2, 3, 64, 64)))
    y = torch.tensor([0, 1])
    for ms in (c[1] for c in cases):  # warm-up: lazy one-time work is allowed
        ms.backward(cases[0][2] if ms.branch.name != "swin" else torch.randn(2, 3, 64, 64), y, CE)

    def boom(*a, **k):
        raise NoSync("host sync in the step")

    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for _, ms, x in cases:
        ms.backward(x, y, CE)
        ms.backward(x, y, CE, sync=False, loss_scale=0.5)
