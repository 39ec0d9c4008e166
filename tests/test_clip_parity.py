"""``ClipMaskSub(mode="none")`` is open_clip's own training step: the same loss and, bit for bit,
the same gradients as ``ClipLoss()(*model(images, texts)).backward()``; an optimizer step of each
ends at the same weights."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from test_clip_step import make, model_name, pairs  # noqa: E402, F401

from masksub.integrations.clip import ClipMaskSub, clamp_logit_scale  # noqa: E402


@pytest.mark.parametrize("order", ["memory", "fused"])
def test_mode_none_is_the_open_clip_step(model_name, order):  # noqa: F811
    images, texts = pairs()
    ours, ref = make(model_name).train(), make(model_name).train()
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ms = ClipMaskSub(ours, mode="none", order=order)
    loss_fn = open_clip.ClipLoss()
    for _ in range(2):
        out = ms.backward(images, texts)
        loss = loss_fn(*ref(images, texts))
        loss.backward()
        assert torch.equal(out.loss_main, loss.detach())
        for (n, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None), n
            assert a.grad is None or torch.equal(a.grad, b.grad), n
        for opt, m in ((opt_a, ours), (opt_b, ref)):
            opt.step()
            opt.zero_grad()
            clamp_logit_scale(m)
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
