"""Eq. (1)-(3) against hand-written references on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import masksub
from masksub import MaskSub, relaxed_loss

SUB = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
MAIN = torch.tensor([[1.0, 0.0, -1.0], [-2.0, 0.5, 0.5]])


def ref_soft_ce(sub, main):
    total = 0.0
    for s_row, m_row in zip(sub.tolist(), main.tolist(), strict=True):
        zm = sum(math.exp(v) for v in m_row)
        zs = math.log(sum(math.exp(v) for v in s_row))
        total += -sum(math.exp(m) / zm * (s - zs) for s, m in zip(s_row, m_row, strict=True))
    return total / len(sub)


def ref_bce(sub, main):
    vals = []
    for s_row, m_row in zip(sub.tolist(), main.tolist(), strict=True):
        for s, m in zip(s_row, m_row, strict=True):
            t = 1 / (1 + math.exp(-m))
            p = 1 / (1 + math.exp(-s))
            vals.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
    return sum(vals) / len(vals)


def test_softmax_form_matches_reference():
    assert relaxed_loss(SUB, MAIN).item() == pytest.approx(ref_soft_ce(SUB, MAIN), rel=1e-6)


def test_sigmoid_form_matches_reference():
    got = relaxed_loss(SUB, MAIN, kind="sigmoid").item()
    assert got == pytest.approx(ref_bce(SUB, MAIN), rel=1e-6)


def test_mse_form_matches_reference():
    ref = ((SUB - MAIN) ** 2).mean().item()
    assert relaxed_loss(SUB, MAIN, kind="mse").item() == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "mse"])
def test_main_side_detached(kind):
    sub = SUB.clone().requires_grad_()
    main = MAIN.clone().requires_grad_()
    relaxed_loss(sub, main, kind).backward()
    assert main.grad is None
    assert sub.grad is not None and sub.grad.abs().sum() > 0


def test_softmax_gradient_is_prob_difference():
    # d/ds of soft CE = (softmax(s) - softmax(m)) / B
    sub = SUB.clone().requires_grad_()
    relaxed_loss(sub, MAIN).backward()
    want = (SUB.softmax(-1) - MAIN.softmax(-1)) / SUB.shape[0]
    torch.testing.assert_close(sub.grad, want)


def test_minimum_at_equal_logits():
    # soft CE against itself equals the entropy: the lowest value over sub logits
    at_target = relaxed_loss(MAIN, MAIN).item()
    entropy = -(MAIN.softmax(-1) * MAIN.log_softmax(-1)).sum(-1).mean().item()
    assert at_target == pytest.approx(entropy, rel=1e-6)
    assert relaxed_loss(SUB, MAIN).item() > at_target


def test_float32_under_bf16_inputs():
    out = relaxed_loss(SUB.bfloat16(), MAIN.bfloat16())
    assert out.dtype == torch.float32 and out.ndim == 0


class Linear(nn.Module):
    """A model whose forward takes the ratio: the sub-branch scales its input by (1 - ratio)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask_ratio: float = 0.0):
        return self.fc(x * (1 - mask_ratio))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.25)])
def test_total_and_weights_match_hand_written_step(kind, weights):
    """Eq. (1) + Eq. (3), each weighted (paper: 1/2), reach .grad as one summed gradient."""
    torch.manual_seed(0)
    model = Linear()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    crit = nn.CrossEntropyLoss()
    wm, ws = weights
    ms = MaskSub(model, "mask", 0.5, kind=kind, main_weight=wm, sub_weight=ws)
    out = ms.backward(x, y, crit)
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    main = model(x)
    sub = model(x, mask_ratio=0.5)
    l1 = crit(main, y)
    t = main.detach()
    if kind == "softmax":
        l2 = -(t.softmax(-1) * sub.log_softmax(-1)).sum(-1).mean()
    else:
        l2 = nn.functional.binary_cross_entropy_with_logits(sub, t.sigmoid())
    (wm * l1 + ws * l2).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    torch.testing.assert_close(out.loss_main, l1.detach())
    torch.testing.assert_close(out.loss_sub, l2.detach())
    torch.testing.assert_close(out.loss, wm * l1.detach() + ws * l2.detach())
    assert not out.loss.requires_grad and out.loss.ndim == 0


def test_default_total_is_half_sum():
    model = Linear()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    out = MaskSub(model, "mask", 0.3).backward(x, y, nn.CrossEntropyLoss())
    torch.testing.assert_close(out.loss, (out.loss_main + out.loss_sub) / 2)


def test_public_names():
    for name in ("MaskSub", "MaskSubError", "StepOutput", "relaxed_loss", "sub_branch"):
        assert hasattr(masksub, name)
    assert issubclass(masksub.MaskSubError, ValueError)


def test_core_imports_torch_alone():
    import subprocess
    import sys

    code = ("import sys, masksub, masksub.step, masksub.branches, masksub.loss; "
            "bad = [m for m in ('timm', 'transformers', 'open_clip', 'torchvision') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
