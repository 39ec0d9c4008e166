"""Bad input to the core gets a MaskSubError that says what to do, before any work."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_fails_before_forward, tiny_resnet, tiny_vit
from torch import nn

from masksub import MaskSub, MaskSubError, relaxed_loss, sub_branch

CE = nn.CrossEntropyLoss()


@pytest.fixture
def vit():
    return tiny_vit(img_size=32, drop_path_rate=0.1, drop_rate=0.1)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, math.nan, math.inf])
@pytest.mark.parametrize("mode", ["mask", "dropout", "droppath"])
def test_ratio_outside_unit_interval(vit, mode, ratio):
    with pytest.raises(MaskSubError, match=r"in \[0, 1\)"):
        MaskSub(vit, mode, ratio)
    with pytest.raises(MaskSubError, match=r"in \[0, 1\)"), sub_branch(vit, mode, ratio):
        pytest.fail("entered")


@pytest.mark.parametrize("ratio", ["0.5", True, object(), [0.5]])
def test_ratio_of_wrong_type(vit, ratio):
    with pytest.raises(MaskSubError, match="must be a number"):
        MaskSub(vit, "mask", ratio)


def test_unknown_mode_family_order_kind(vit):
    with pytest.raises(MaskSubError, match="mode must be one of"):
        MaskSub(vit, "masking")
    with pytest.raises(MaskSubError, match="unknown family 'vitt'"):
        MaskSub(vit, "mask", family="vitt")
    with pytest.raises(MaskSubError, match="order must be one of"):
        MaskSub(vit, order="fast")
    with pytest.raises(MaskSubError, match="kind must be one of"):
        MaskSub(vit, kind="kl")
    with pytest.raises(MaskSubError, match="kind must be one of"):
        relaxed_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="kl")


def test_mode_the_family_does_not_support(vit):
    with pytest.raises(MaskSubError, match="does not support mode 'mask'"):
        MaskSub(vit, "mask", family="dropout")
    with pytest.raises(MaskSubError, match="does not support mode 'dropout'"), \
            sub_branch(vit, "dropout", 0.2, family=MaskSub(vit, "mask").branch):
        pytest.fail("entered")


def test_unknown_family_option(vit):
    with pytest.raises(MaskSubError, match=r"takes no option\(s\) \['patch_size'\]"):
        MaskSub(vit, "mask", patch_size=16)
    with pytest.raises(MaskSubError, match="patch_size must be a positive int"):
        MaskSub(tiny_resnet(), "mask", patch_size=0)


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, "0.5", True])
def test_bad_weights(vit, bad):
    with pytest.raises(MaskSubError, match="main_weight"):
        MaskSub(vit, main_weight=bad)


def test_wrong_types():
    with pytest.raises(MaskSubError, match="takes an nn.Module"):
        MaskSub(lambda x: x)
    with pytest.raises(MaskSubError, match="two logit tensors"):
        relaxed_loss([[0.0, 1.0]], torch.zeros(1, 2))
    with pytest.raises(MaskSubError, match="mask_fn must be callable"):
        MaskSub(nn.Linear(2, 2), "mask", mask_fn=3)
    with pytest.raises(MaskSubError, match="mode is off"):
        MaskSub(nn.Linear(2, 2), None, 0.5)


def test_mismatched_main_and_sub_logits():
    with pytest.raises(MaskSubError, match=r"\(2, 3\) and main-branch logits \(2, 4\) differ"):
        relaxed_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_sub_forward_with_other_shape_fails_before_sub_backward():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, mask_ratio: float = 0.0):
            out = self.fc(x)
            return out[:, :2] if mask_ratio else out

    model = Odd()
    with pytest.raises(MaskSubError, match="differ in shape"):
        MaskSub(model, "mask", 0.5, order="fused").backward(torch.randn(2, 4), torch.tensor([0, 1]), CE)
    assert model.fc.weight.grad is None


@pytest.mark.parametrize("crit", [
    nn.CrossEntropyLoss(reduction="none"),
    lambda out, y: (out.sum(), 0.0),
    lambda out, y: 1.0,
])
@pytest.mark.parametrize("order", ["memory", "fused"])
def test_criterion_returning_non_scalar(vit, crit, order):
    ms = MaskSub(vit, "mask", 0.5, order=order)
    with pytest.raises(MaskSubError, match="scalar loss"):
        ms.backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), crit)
    assert all(p.grad is None for p in vit.parameters())


def test_grad_norms_need_memory_order(vit):
    ms = MaskSub(vit, "mask", 0.5, order="fused")
    assert_fails_before_forward(
        vit, lambda: ms.backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), CE, grad_norms=True),
        "grad_norms=True needs order='memory'")


def test_no_logits_in_output():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            return {"a": self.fc(x)}

    with pytest.raises(MaskSubError, match="forward_fn"):
        MaskSub(Weird(), "dropout").backward(torch.randn(2, 2), torch.tensor([0, 1]), CE)


def test_messages_are_value_errors(vit):
    with pytest.raises(ValueError):
        MaskSub(vit, "mask", 2.0)
