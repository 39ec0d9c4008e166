"""The library's own guarantees (issue 11, cases 13-15): errors leave ``.grad`` as it was, a
dropout / drop-path sub-branch refuses a model in eval(), step arguments are checked up front."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from masksub import MaskSub, MaskSubError

CE = nn.CrossEntropyLoss()


class Odd(nn.Module):
    """Its sub-branch (``mask_ratio`` > 0) returns logits of another shape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        out = self.fc(x)
        return out[:, :2] if mask_ratio else out


def test_memory_order_mismatch_leaves_grad_untouched() -> None:
    """Case 13: README says the mismatch fails "before any gradient is touched"."""
    model = Odd()
    ms = MaskSub(model, "mask", 0.5, order="memory")
    with pytest.raises(MaskSubError, match="differ in shape"):
        ms.backward(torch.randn(2, 4), torch.tensor([0, 1]), CE)
    assert model.fc.weight.grad is None and model.fc.bias.grad is None


def test_memory_order_error_with_accumulated_grad_says_so() -> None:
    """With gradients already accumulated, the error says the main branch's part was added."""
    model = Odd()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    ms = MaskSub(model, "mask", 0.5, order="memory")
    with pytest.raises(MaskSubError, match="already added"):
        ms.backward(torch.randn(2, 4), torch.tensor([0, 1]), CE)
    assert model.fc.bias.grad is None  # had none before: none after


def _mlp(**kw) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2,
                             num_classes=3, img_size=32, patch_size=8, **kw)


@pytest.mark.parametrize("mode, kw", [("dropout", {"proj_drop_rate": 0.1}), ("droppath", {"drop_path_rate": 0.1})])
def test_drop_sub_branch_refuses_a_model_in_eval(mode: str, kw: dict) -> None:
    """Case 14: in eval() dropout / drop-path do nothing, the sub-branch would equal the main."""
    model = _mlp(**kw)
    ms = MaskSub(model, mode)
    model.eval()
    with pytest.raises(MaskSubError, match=r"eval\(\)"):
        ms.forward_sub(torch.randn(2, 3, 32, 32))
    with pytest.raises(MaskSubError, match=r"eval\(\)"):
        ms.backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), CE)
    assert all(p.grad is None for p in model.parameters())
    model.train()
    ms.backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), CE)  # fine in train()


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), 0.0, "1"])
def test_bad_loss_scale_is_refused_before_forward(scale) -> None:
    """Case 15: a negative / NaN loss_scale used to be accepted."""
    from conftest import assert_fails_before_forward

    model = nn.Linear(4, 3)
    ms = MaskSub(model, None)
    assert_fails_before_forward(model, lambda: ms.backward(torch.randn(2, 4), torch.tensor([0, 1]), CE,
                                                            loss_scale=scale), "loss_scale")


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                         ("fp16", torch.float16), ("float16", torch.float16),
                                         ("half", torch.float16), ("none", None), ("fp32", None)])
def test_amp_dtype_takes_common_strings(name: str, dtype) -> None:
    ms = MaskSub(nn.Linear(4, 3), None, amp_dtype=name)
    assert ms.amp_dtype == dtype


@pytest.mark.parametrize("bad", ["bf61", "int8", 16, torch.int8])
def test_amp_dtype_bad_value_is_refused_at_construction(bad) -> None:
    with pytest.raises(MaskSubError, match="amp_dtype"):
        MaskSub(nn.Linear(4, 3), None, amp_dtype=bad)
