"""The Python API's bad input gets a MaskSubError that says what to do, before any forward:
a frozen model, a list instead of a batch, a single 3-D image, an empty batch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_resnet, tiny_swin, tiny_vit
from torch import nn

from masksub import MaskSub, MaskSubError

CE = nn.CrossEntropyLoss()
MODELS = {"vit": lambda: tiny_vit(img_size=32), "resnet": tiny_resnet, "swin": tiny_swin}
CASES = {
    "list": ([torch.randn(3, 32, 32), torch.randn(3, 32, 32)], torch.tensor([1, 0]), "list of 2"),
    "3d": (torch.randn(3, 32, 32), torch.tensor([1]), r"\(3, 32, 32\).*unsqueeze"),
    "empty": (torch.randn(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), "empty"),
}


@pytest.mark.parametrize("call", ["backward", "loss"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_bad_batch_is_refused_before_any_forward(family, case, call):
    model = MODELS[family]()
    ms = MaskSub(model)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y, match = CASES[case]
    with pytest.raises(MaskSubError, match=match):
        getattr(ms, call)(x, y, CE)
    assert not calls and all(p.grad is None for p in model.parameters())


def test_a_frozen_model_is_refused_with_advice():
    model = tiny_vit(img_size=32)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(MaskSubError, match="frozen.*unfreeze"):
        MaskSub(model).backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), CE)


def test_a_partly_frozen_model_trains():
    model = tiny_vit(img_size=32)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head"))
    MaskSub(model).backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), CE)
    assert model.head.weight.grad is not None
