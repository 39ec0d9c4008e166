"""ViT token removal (MAE style), through timm's own ``patch_drop`` slot.

timm's VisionTransformer calls ``self.patch_drop(x)`` right after position embedding, with
the prefix tokens (class, registers) first. For the sub forward that slot holds a
``TokenRemoval`` that keeps the prefix and a random ``1 - ratio`` of the patch tokens, so the
blocks run on about half the tokens: the sub-branch costs about half a main forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError
from .base import Family, PerModel
from .masks import masked_count


def kept_count(n: int, ratio: float) -> int:
    """Patch tokens left after removal: never zero, so a model without prefix tokens still
    has something to pool."""
    return max(1, n - masked_count(n, ratio)) if n else 0


class TokenRemoval(nn.Module):
    """Keep the prefix tokens and ``L - round(ratio * L)`` (at least 1) random patch tokens.

    ``return_indices=True`` returns ``(x, keep_indices)`` like timm's
    ``PatchDropoutWithIndices``, for models (timm Eva) that gather their rotary embedding with it.
    """

    def __init__(self, ratio: float, num_prefix_tokens: int = 1, return_indices: bool = False) -> None:
        super().__init__()
        self.ratio = ratio
        self.num_prefix_tokens = num_prefix_tokens
        self.return_indices = return_indices

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor | None]:
        p = self.num_prefix_tokens
        prefix, tokens = x[:, :p], x[:, p:]
        b, n, d = tokens.shape
        keep = kept_count(n, self.ratio)
        if keep >= n:
            return (x, None) if self.return_indices else x
        # topk of uniform noise = a uniform random subset, cheaper than a full argsort.
        idx = torch.rand(b, n, device=x.device).topk(keep, dim=1, sorted=False).indices
        kept = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, d))
        out = torch.cat([prefix, kept], dim=1) if p else kept
        return (out, idx) if self.return_indices else out


class ViTTokenRemoval(Family):
    """timm ``VisionTransformer`` and subclasses (DeiT-III, MAE / CLIP finetune), timm ``Eva``:
    drop tokens."""

    name = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hasattr(model, "patch_drop") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._removal = PerModel()  # one module per model: compiled graphs see the same one

    def validate(self, model: nn.Module, x: Any) -> None:
        pe = model.patch_embed
        img = getattr(pe, "img_size", None)
        if not (isinstance(x, Tensor) and x.ndim == 4 and img is not None and getattr(pe, "strict_img_size", False)):
            return  # other inputs (custom forward_fn) are the model's to check
        if tuple(x.shape[-2:]) != tuple(img):
            raise MaskSubError(
                f"image size {x.shape[-2]}x{x.shape[-1]} does not match the ViT's img_size "
                f"{img[0]}x{img[1]}; resize the images or build the model with img_size={x.shape[-1]} "
                "(or dynamic_img_size=True)"
            )

    @staticmethod
    def _make_removal(model: nn.Module) -> TokenRemoval:
        # timm Eva leaves the slot None (or a PatchDropoutWithIndices) and unpacks (x, indices).
        old = model.patch_drop
        with_indices = old is None or type(old).__name__ == "PatchDropoutWithIndices"
        return TokenRemoval(0.0, int(model.num_prefix_tokens), with_indices)

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        old = model.patch_drop
        removal = self._removal.get(model, self._make_removal)
        removal.ratio = ratio
        model.patch_drop = removal
        try:
            yield
        finally:
            model.patch_drop = old


class OpenClipTokenRemoval(ViTTokenRemoval):
    """open_clip's ``VisionTransformer`` tower (detected by its attributes; open_clip is never
    imported): the same token removal in its own ``patch_dropout`` slot, which it applies right
    after the position embedding, class token first, in train mode."""

    name = "open_clip_vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("patch_dropout", "positional_embedding", "conv1", "transformer"))

    def validate(self, model: nn.Module, x: Any) -> None:
        return None  # the tower checks its own input size

    @staticmethod
    def _make_removal(model: nn.Module) -> TokenRemoval:
        return TokenRemoval(0.0, 0 if getattr(model, "class_embedding", None) is None else 1)

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        old = model.patch_dropout
        removal = self._removal.get(model, self._make_removal)
        removal.ratio = ratio
        model.patch_dropout = removal
        try:
            yield
        finally:
            model.patch_dropout = old
