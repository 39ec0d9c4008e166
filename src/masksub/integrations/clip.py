"""MaskSub for open_clip models (the paper's CLIP pretraining, Table 12).

Main branch: the usual contrastive loss (``open_clip.ClipLoss``) on full images and texts.
Sub-branch: the same model with 50% of the image patch tokens removed in the vision tower
(MAE style, class token kept), through open_clip's own ``patch_dropout`` slot, the way the
core's "vit" family uses timm's ``patch_drop``. Its similarity logits learn, in both
directions, the softmax of the main branch's detached logits (Eq. 3 on ``logits_per_image``
and on ``logits_per_text``, averaged like ClipLoss averages its two directions).

Only the images are masked, so the sub-branch's text features equal the main ones. By default
(``text="shared"``) they are reused *with* their graph: the sub-branch is the whole model with
masked images, as in the paper, and its loss also trains the text tower; one backward on the
weighted sum then does both branches. ``text="detached"`` reuses them detached: the sub loss
trains only the image tower (and the logit scale), which allows the memory-saving order (main
backward first, then the half-cost masked vision forward + backward); under DDP that order
leaves the text tower without gradient in the second backward, so build DDP with
``find_unused_parameters=True`` for it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..branches import resolve_ratio, unwrap
from ..branches.vit import OpenClipTokenRemoval, ViTTokenRemoval
from ..errors import MaskSubError
from ..loss import relaxed_loss
from ..step import (
    ORDERS,
    check_order,
    check_weights,
    ddp_no_sync,
    model_autocast,
    plain_backward,
    resolve_amp_dtype,
    two_branch_step,
)

TEXT_MODES = ("shared", "detached")


@contextlib.contextmanager
def masked_image_tower(model: nn.Module, ratio: float = 0.5) -> Iterator[nn.Module]:
    """Inside, the model's vision tower keeps the class token and ``1 - ratio`` of the patches.

    Both kinds of tower go through a core family: open_clip's ``VisionTransformer`` through
    "open_clip_vit" (its ``patch_dropout`` slot), a timm tower (``TimmModel``) through "vit" on
    its ``trunk`` (timm's ``patch_drop``).
    """
    visual = getattr(unwrap(model), "visual", None)
    if visual is None:
        raise MaskSubError(f"{type(unwrap(model)).__name__} has no .visual tower; pass an open_clip CLIP model")
    if OpenClipTokenRemoval.matches(visual):
        tower, family = visual, _OPEN_CLIP
    elif ViTTokenRemoval.matches(getattr(visual, "trunk", None)):
        tower, family = visual.trunk, _TIMM
    else:
        raise MaskSubError(
            f"cannot remove image tokens in {type(visual).__name__}: masksub supports open_clip's "
            "VisionTransformer (patch_dropout slot) and timm ViT towers (trunk.patch_drop); ModifiedResNet "
            "towers have no tokens to drop"
        )
    with family.apply(tower, ratio):
        yield model


# One family object per kind: each keeps one removal module per tower (compiled graphs see the same one).
_OPEN_CLIP, _TIMM = OpenClipTokenRemoval(), ViTTokenRemoval()


@dataclass
class ClipStepOutput:
    """Detached results of one step; losses before the 1/2 weights."""

    loss_main: Tensor
    loss_sub: Tensor | None
    loss: Tensor
    logits_per_image: Tensor


def clip_features(model: nn.Module, images: Tensor | None, texts: Tensor | None) -> tuple[Any, Any, Tensor, Any]:
    """(image_features, text_features, logit_scale, logit_bias) from an open_clip forward."""
    out = model(images, texts)
    if isinstance(out, Mapping):
        return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
    if isinstance(out, (tuple, list)) and len(out) in (3, 4):
        return out[0], out[1], out[2], (out[3] if len(out) == 4 else None)
    raise MaskSubError(f"unexpected open_clip output {type(out).__name__}; expected CLIP features and logit_scale")


class ClipMaskSub:
    """One MaskSub step for an open_clip model, in the user's loop.

    >>> ms = ClipMaskSub(model, ratio=0.5)            # mode="none" for the plain CLIP step
    >>> out = ms.backward(images, texts)                # grads of (loss_main + loss_sub) / 2
    >>> optimizer.step(); optimizer.zero_grad()

    ``loss`` is an ``open_clip.ClipLoss`` (pass yours for rank / world_size: its logit
    gathering is reused for both branches). Clipping, the optimizer step and clamping the
    logit scale stay with the caller.
    """

    def __init__(self, model: nn.Module, mode: str | None = "mask", ratio: float | None = None, *,
                 text: str = "shared", loss: nn.Module | None = None, main_weight: float = 0.5,
                 sub_weight: float = 0.5, amp_dtype: torch.dtype | str | None = None,
                 order: str = "memory") -> None:
        import open_clip

        if mode not in (None, "none", "mask"):
            raise MaskSubError(f"the CLIP step supports mode 'mask' or 'none', got {mode!r}")
        if text not in TEXT_MODES:
            raise MaskSubError(f"text must be one of {TEXT_MODES}, got {text!r}")
        check_order(order)
        if text == "detached" and hasattr(model, "no_sync") and not getattr(model, "find_unused_parameters", True):
            raise MaskSubError(
                "text='detached' leaves the text tower out of the sub-branch's backward, which DDP built with "
                "find_unused_parameters=False waits for forever: use text='shared' with order='memory' (same "
                "peak memory order, every parameter in the one synced backward)"
            )
        self.loss_fn = loss if loss is not None else open_clip.ClipLoss()
        if not (hasattr(self.loss_fn, "get_logits") and hasattr(self.loss_fn, "get_ground_truth")):
            raise MaskSubError("loss must be an open_clip.ClipLoss (or subclass): its get_logits is reused")
        if getattr(unwrap(model), "logit_bias", None) is not None:
            raise MaskSubError("this model has a logit_bias (SigLIP): its sigmoid loss is not the softmax "
                               "contrastive loss the CLIP sub-branch learns from; use a CLIP model")
        self.model = model
        self.mode = None if mode in (None, "none") else "mask"
        self.ratio = resolve_ratio("mask", ratio if ratio is not None else 0.5) if self.mode else 0.0
        if self.mode is None and ratio is not None:
            raise MaskSubError("mode='none' has no sub-branch: drop ratio or set mode='mask'")
        self.text = text
        self.order = order
        self.main_weight, self.sub_weight = check_weights(main_weight, sub_weight)
        self.amp_dtype = resolve_amp_dtype(amp_dtype)
        self._check_tower()

    def _check_tower(self) -> None:
        if self.mode is not None:
            with masked_image_tower(self.model, self.ratio):
                pass

    def _autocast(self) -> contextlib.AbstractContextManager:
        return model_autocast(self.model, self.amp_dtype)

    def logits(self, img: Tensor, txt: Tensor, scale: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.loss_fn.get_logits(img, txt, scale, bias)

    def contrastive(self, lpi: Tensor, lpt: Tensor) -> Tensor:
        """ClipLoss's own loss on already computed logits (mean of both directions)."""
        labels = self.loss_fn.get_ground_truth(lpi.device, lpi.shape[0])
        return (nn.functional.cross_entropy(lpi.float(), labels) + nn.functional.cross_entropy(lpt.float(), labels)) / 2

    def relaxed(self, sub: tuple[Tensor, Tensor], main: tuple[Tensor, Tensor]) -> Tensor:
        """Eq. (3) image->text and text->image, averaged."""
        return (relaxed_loss(sub[0], main[0]) + relaxed_loss(sub[1], main[1])) / 2

    def backward(self, images: Tensor, texts: Tensor, *, scaler: torch.amp.GradScaler | None = None,
                 sync: bool = True, loss_scale: float = 1.0,
                 backward_fn: Callable[[Tensor], None] | None = None) -> ClipStepOutput:
        """Main and sub forward + backward; the gradients of both losses end summed in ``.grad``.

        Under DDP only the sub forward runs outside ``no_sync()`` (DDP arms its all-reduce at
        forward time), so the gradients are all-reduced once per step, as in a plain CLIP step;
        ``sync=False`` keeps that one off too (gradient accumulation). ``backward_fn`` runs each
        backward instead of ``loss.backward()`` (e.g. ``accelerator.backward``).
        """
        if backward_fn is not None and scaler is not None:
            raise MaskSubError("pass scaler or backward_fn, not both (backward_fn scales the loss itself)")
        model = self.model
        # order memory (or detached text): the main backward runs first, freeing the image tower
        order = "memory" if (self.order == "memory" or self.text == "detached") else "fused"
        leaf = self.mode is not None and order == "memory" and self.text == "shared"
        held: dict[str, Any] = {}

        def main() -> tuple[Tensor, tuple[Tensor, Tensor]]:
            with self._autocast():
                img, txt, scale, bias = clip_features(model, images, texts)
                # memory order, shared text: the main loss sees the text features as a leaf, so its
                # backward frees the image tower's graph and keeps the text tower's for the last one
                held["txt"], held["txt_main"] = txt, (txt.detach().requires_grad_() if leaf else txt)
                main = self.logits(img, held["txt_main"], scale, bias)
                loss_main = self.contrastive(*main)
            return loss_main, (main[0].detach(), main[1].detach())

        def sub(target: tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
            txt = held.pop("txt")
            with self._autocast(), masked_image_tower(model, self.ratio):
                img_s, _, scale_s, bias_s = clip_features(model, images, None)
                sub = self.logits(img_s, txt.detach() if self.text == "detached" else txt, scale_s, bias_s)
            loss_sub = self.relaxed(sub, target)
            if leaf:  # the text tower's backward also carries the main loss's gradient
                return loss_sub, _inject_grad(txt, held.pop("txt_main").grad)
            return loss_sub

        res = two_branch_step(main, sub if self.mode is not None else None, order=order,
                              weights=(self.main_weight, self.sub_weight), loss_scale=loss_scale,
                              backward=backward_fn or plain_backward(scaler),
                              no_sync=lambda: ddp_no_sync(model), sync=sync)
        lm = res.loss_main
        if res.loss_sub is None:
            return ClipStepOutput(lm, None, lm, res.target[0])
        ls = res.loss_sub
        return ClipStepOutput(lm, ls, lm * self.main_weight + ls * self.sub_weight, res.target[0])


class _InjectGrad(torch.autograd.Function):
    """A zero whose backward hands ``grad`` to ``x`` whatever the incoming gradient: the main loss's
    gradient on the shared text features (already scaled by the same backward), added to the
    sub backward's loss so that the text tower runs backward once, for both branches."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad, None


def _inject_grad(x: Tensor, grad: Tensor | None) -> Tensor:
    return x.new_zeros(()) if grad is None else _InjectGrad.apply(x, grad)


def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """open_clip's training clamps the learned temperature at ln(100) after each step."""
    inner = unwrap(model)
    with torch.no_grad():
        inner.logit_scale.clamp_(0, math.log(max_scale))


__all__ = ["ORDERS", "ClipMaskSub", "ClipStepOutput", "TEXT_MODES", "clamp_logit_scale", "clip_features",
           "masked_image_tower"]
