"""CNNs with a conv + LayerNorm stem (ConvNeXt, FocalNet, EdgeNeXt, MambaOut, MetaFormer, ...):
the 32 px regions are masked *after the stem's norm*, with a learnable mask token.

Zeroing the pixels of such a model makes the stem conv's output constant over a region (its
bias starts at 0) and the LayerNorm after it divides by sqrt(eps): the sub-branch gradient
starts at 1e7 to inf times the main one. Zeroing the stem's *output* moves the same singularity
to the first block's norm (the depthwise conv of a zero region is 0 again). A mask token after
the stem's norm removes the same information (the regions the 32 px squares cover, in feature
cells: 8x8 cells behind a stride-4 stem) with a non-constant vector, and the sub/main gradient
ratio starts at 0.1-0.5 (measured on convnext_atto, focalnet_tiny_srf, edgenext_xx_small,
mambaout_femto, caformer_s18). The stem module is swapped for a wrapper in its own slot for the
sub forward (a swap, not a hook: ``torch.compile`` does not guard on hooks). Cost: one main
forward.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError
from .base import Family, PerModel
from .mask_token import TOKEN_NAME, ensure_mask_token
from .masks import random_mask
from .pixel import check_image_batch

STEM_SLOTS = ("stem", "embeddings")  # timm; Hugging Face ConvNeXt / ConvNeXtV2 (model.convnext.embeddings)


def _is_layer_norm(m: nn.Module) -> bool:
    """LayerNorm over channels: torch's, timm's LayerNorm2d / LayerNorm2dNoBias, GroupNorm(1)."""
    if isinstance(m, nn.LayerNorm):
        return True
    if isinstance(m, nn.GroupNorm):
        return m.num_groups == 1
    return "LayerNorm" in type(m).__name__


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or "Norm" in type(m).__name__


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``stem`` / ``embeddings`` modules of the model or of one of its children, by path."""
    out = [(s, getattr(model, s)) for s in STEM_SLOTS if isinstance(getattr(model, s, None), nn.Module)]
    for cname, child in model.named_children():
        out += [(f"{cname}.{s}", getattr(child, s)) for s in STEM_SLOTS
                if isinstance(getattr(child, s, None), nn.Module)]
    return out


def find_stem(model: nn.Module) -> tuple[str, int] | None:
    """(dotted slot, channels) of a conv stem whose last norm is a LayerNorm, else None."""
    for slot, stem in _candidates(model):
        convs = [m for m in stem.modules() if isinstance(m, nn.Conv2d)]
        if not convs or any(isinstance(m, nn.Embedding) for m in stem.modules()):
            continue
        norms = [m for m in stem.modules() if _is_norm(m) and m is not stem]
        if not norms or not _is_layer_norm(norms[-1]):
            continue
        last = norms[-1]
        shape = getattr(last, "normalized_shape", None)
        dim = shape[0] if shape else getattr(last, "num_channels", None)
        if isinstance(dim, int):
            return slot, dim
    return None


class MaskedStem(nn.Module):
    """The model's own stem, then the mask token on ``ratio`` of the regions its output covers
    for each ``region_px`` x ``region_px`` square of the image. One per model."""

    def __init__(self, stem: nn.Module, model: nn.Module, dim: int, region_px: int) -> None:
        super().__init__()
        self.stem = stem
        self._model = [model]  # not a submodule: the model owns the stem wrapper, not the reverse
        self.dim = dim
        self.region_px = region_px
        self.ratio = 0.0

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.stem(x, *args, **kwargs)
        token = getattr(self._model[0], TOKEN_NAME)
        nhwc = out.ndim == 4 and out.shape[1] != self.dim and out.shape[-1] == self.dim
        h, w = (out.shape[1], out.shape[2]) if nhwc else (out.shape[2], out.shape[3])
        stride = x.shape[-2] // h
        if stride < 1 or x.shape[-2] != h * stride or x.shape[-1] != w * stride or self.region_px % stride:
            raise MaskSubError(
                f"the stem maps {x.shape[-2]}x{x.shape[-1]} pixels to {h}x{w} cells, which does not tile "
                f"{self.region_px} px mask regions; use an image size that is a multiple of {self.region_px}"
            )
        r = self.region_px // stride  # cells per region side
        gh, gw = h // r, w // r
        b = out.shape[0]
        m = random_mask(b, gh * gw, self.ratio, out.device).view(b, gh, 1, gw, 1)
        m = m.expand(-1, -1, r, -1, r).reshape(b, h, w)
        tok = token.to(out.dtype)
        if nhwc:
            return torch.where(m.unsqueeze(-1), tok, out)
        return torch.where(m.unsqueeze(1), tok.view(1, -1, 1, 1), out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.stem, name)


class StemMaskToken(Family):
    """A CNN whose ``stem`` (timm) or ``embeddings`` (Hugging Face ConvNeXt) is a conv ending in
    a LayerNorm: mask token on 32 px regions after the stem.

    Option: ``region_px`` (pixels per mask region side, default 32; a multiple of the stem stride).
    """

    name = "stem"
    adds_parameters = True

    def __init__(self, region_px: int = 32, **options: Any) -> None:
        super().__init__(**options)
        if not isinstance(region_px, int) or region_px < 1:
            raise MaskSubError(f"region_px must be a positive int, got {region_px!r}")
        self.region_px = region_px
        self._wrappers = PerModel()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return find_stem(model) is not None

    @staticmethod
    def _stem(model: nn.Module) -> tuple[str, int]:
        found = find_stem(model)
        if found is None:
            raise MaskSubError(
                f"{type(model).__name__} has no conv stem ending in a LayerNorm (model.stem) for the "
                "'stem' family; use family='pixel' or mask_fn="
            )
        return found

    def prepare(self, model: nn.Module) -> None:
        ensure_mask_token(model, self._stem(model)[1])

    def validate(self, model: nn.Module, x: Any) -> None:
        check_image_batch(x, "the stem sub-branch", self.region_px)

    def _make(self, model: nn.Module) -> MaskedStem:
        slot, dim = self._stem(model)
        return MaskedStem(model.get_submodule(slot), model, dim, self.region_px)

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        if getattr(model, TOKEN_NAME, None) is None:
            warnings.warn(
                "the mask token was created inside the sub-branch context and is not in your "
                "optimizer; build MaskSub (or call masksub.prepare) before the optimizer", stacklevel=3)
            self.prepare(model)
        slot, _ = self._stem(model)
        wrapper = self._wrappers.get(model, self._make)
        owner_path, _, name = slot.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        stem = owner._modules[name]
        if wrapper.stem is not stem:  # the slot was given another module since
            wrapper.stem = stem
        wrapper.ratio = ratio
        owner._modules[name] = wrapper
        try:
            yield
        finally:
            owner._modules[name] = stem
