"""The paper's losses: Eq. (1) is the user's criterion, Eq. (3) the relaxed sub-branch loss.

Eq. (3) is a soft cross-entropy of the sub-branch against the main branch's *detached*
prediction, so the sub-branch learns from the main branch and never sends gradient into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MaskSubError

KINDS = ("softmax", "sigmoid", "mse")


def relaxed_loss(sub_logits: Tensor, main_logits: Tensor, kind: str = "softmax") -> Tensor:
    """Eq. (3): the sub-branch learns the main branch's detached prediction.

    ``softmax``: mean over the batch of ``-sum softmax(main) * log_softmax(sub)``.
    ``sigmoid``: BCE against ``sigmoid(main)``, averaged like ``BCEWithLogitsLoss`` (over all
    elements) so it keeps the scale of a BCE recipe's own Eq. (1).
    ``mse``: squared error to the detached main prediction, for regression heads (STS-B).
    Computed in float32 whatever the autocast dtype, as the target is a probability.
    """
    if kind not in KINDS:
        raise MaskSubError(f"relaxed_loss kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(sub_logits, Tensor) or not isinstance(main_logits, Tensor):
        raise MaskSubError("relaxed_loss takes two logit tensors (sub, main)")
    if sub_logits.shape != main_logits.shape:
        raise MaskSubError(
            f"sub-branch logits {tuple(sub_logits.shape)} and main-branch logits "
            f"{tuple(main_logits.shape)} differ in shape; both branches must see the same batch "
            "and end in the same head"
        )
    sub = sub_logits.float()
    target = main_logits.detach().float()
    if kind == "softmax":
        return torch.sum(-target.softmax(-1) * sub.log_softmax(-1), dim=-1).mean()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(sub, target.sigmoid())
    return F.mse_loss(sub, target)
