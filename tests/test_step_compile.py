"""Under torch.compile the sub-branch really is masked, and steps stop compiling after the first.

Dynamo does not guard on forward hooks added later, so every family changes the model through
module slots or attributes it guards on. The ``eager`` backend keeps this fast on CPU: the
guards and graph breaks are Dynamo's, whatever the backend.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_resnet, tiny_swin, tiny_vit
from torch import nn

from masksub import MaskSub

CASES = {
    "vit_mask": (lambda: tiny_vit(img_size=32, drop_path_rate=0.1), dict(mode="mask", ratio=0.5), 32),
    "swin_mask": (lambda: tiny_swin(), dict(mode="mask", ratio=0.5), 64),
    "resnet_pixel": (lambda: tiny_resnet(), dict(mode="mask", ratio=0.5, patch_size=16), 32),
    "vit_pathsub": (lambda: tiny_vit(img_size=32, depth=2, drop_path_rate=0.1), dict(mode="droppath"), 32),
    "vit_dropsub": (lambda: tiny_vit(img_size=32, drop_rate=0.1), dict(mode="dropout"), 32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_sub_branch_is_the_eager_one(case):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    make, kw, size = CASES[case]
    torch.manual_seed(0)
    model = make()
    ms_eager = MaskSub(model, **kw)
    ms = MaskSub(torch.compile(model, backend="eager"), **kw)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    ce = nn.CrossEntropyLoss()
    compiles = []
    for step in range(3):
        torch.manual_seed(step)
        out = ms.backward(x, y, ce)
        compiles.append(counters["stats"]["unique_graphs"])
        torch.manual_seed(step)
        want_main = ms_eager.forward_main(x)
        want_sub = ms_eager.forward_sub(x)
        torch.testing.assert_close(out.main_logits, want_main.detach())
        torch.testing.assert_close(out.sub_logits, want_sub.detach())
        assert not torch.allclose(out.sub_logits, out.main_logits)
    assert compiles[0] >= 1
    assert compiles[1] == compiles[2], f"recompiled on a later step: {compiles}"
