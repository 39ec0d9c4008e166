"""The one two-branch step every loop shares: ``MaskSub.backward(backward_fn=...)``,
``MaskSub.loss`` for loops that own their backward, one ``ORDERS`` and one AMP-name map."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from torch import nn

from masksub import MaskSub, MaskSubError
from masksub.step import AMP_DTYPES, ORDERS, resolve_amp_dtype, two_branch_step

CE = nn.CrossEntropyLoss()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)


def model():
    torch.manual_seed(0)
    return tiny_vit(img_size=32, depth=2)


def reference_grads(order="fused"):
    net = model()
    x, y = batch()
    torch.manual_seed(7)  # the same token subset in every variant
    MaskSub(net, ratio=0.5, order=order).backward(x, y, CE)
    return grads(net)


@pytest.mark.parametrize("order,calls", [("memory", 2), ("fused", 1)])
def test_backward_fn_is_called_once_per_backward_and_gives_the_same_gradient(order, calls):
    net = model()
    x, y = batch()
    seen = []

    def backward_fn(loss):  # as accelerator.backward: it owns the .backward() call
        seen.append(float(loss.detach()))
        loss.backward()

    torch.manual_seed(7)
    out = MaskSub(net, ratio=0.5, order=order).backward(x, y, CE, backward_fn=backward_fn)
    assert len(seen) == calls
    assert sum(seen) == pytest.approx(float(out.loss), rel=1e-5)
    want = reference_grads(order)
    got = grads(net)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_loss_returns_the_fused_combined_loss_for_a_framework_backward():
    net = model()
    x, y = batch()
    ms = MaskSub(net, ratio=0.5)
    torch.manual_seed(7)
    loss = ms.loss(x, y, CE)
    assert loss.requires_grad and loss.ndim == 0
    assert float(loss.detach()) == pytest.approx(float(ms.last.loss_main) * 0.5 + float(ms.last.loss_sub) * 0.5, rel=1e-6)
    loss.backward()
    want = reference_grads("fused")
    for k, v in grads(net).items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_loss_with_the_sub_branch_off_is_the_plain_loss():
    net = model()
    x, y = batch()
    loss = MaskSub(net, mode="none").loss(x, y, CE)
    torch.testing.assert_close(loss, CE(net(x), y))


def test_memory_order_without_a_backward_is_refused():
    with pytest.raises(MaskSubError, match="backward"):
        two_branch_step(lambda: (torch.zeros((), requires_grad=True), None), lambda t: torch.zeros(()),
                        order="memory", backward=None)


def test_scaler_and_backward_fn_together_are_refused():
    net = model()
    x, y = batch()
    with pytest.raises(MaskSubError, match="not both"):
        MaskSub(net).backward(x, y, CE, scaler=torch.amp.GradScaler("cpu"), backward_fn=lambda loss: None)


def test_one_orders_constant_and_one_amp_map_for_every_loop():
    hf = pytest.importorskip("masksub.integrations.hf")
    clip = pytest.importorskip("masksub.integrations.clip")
    from masksub.bench import cli as bench_cli
    from masksub.train import engine

    assert hf.ORDERS is ORDERS and clip.ORDERS is ORDERS
    assert engine.AMP_DTYPES is AMP_DTYPES
    assert {resolve_amp_dtype(n) for n in bench_cli.DTYPES} == {torch.bfloat16, torch.float16, None}
    for name in ("bf16", "fp16", "none", "fp32"):
        assert name in AMP_DTYPES


@pytest.mark.parametrize("bad", [dict(amp_dtype="fp8"), dict(order="fast"), dict(main_weight=-1),
                                 dict(sub_weight=float("nan"))])
def test_the_clip_step_validates_like_masksub(bad, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    import json

    from test_clip_step import TINY

    from masksub.integrations.clip import ClipMaskSub

    (tmp_path / "masksub-tiny-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "masksub-tiny-clip.json")
    with pytest.raises(MaskSubError):
        ClipMaskSub(open_clip.create_model("masksub-tiny-clip"), **bad)
