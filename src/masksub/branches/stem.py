"""Models whose first conv is followed by a LayerNorm, whatever the modules are called: a
stem (ConvNeXt, FocalNet, EdgeNeXt, MambaOut, MetaFormer) or a patch embedding (PVTv2, Twins,
Hugging Face Swin and Segformer). The 32 px regions are masked *after that norm*, along the
channel axis the norm itself says (NCHW, NHWC, or (B, N, C) tokens), with a learnable mask token.

Zeroing the pixels of such a model makes the stem conv's output constant over a region (its
bias starts at 0) and the LayerNorm after it divides by sqrt(eps): the sub-branch gradient
starts at 1e7 to inf times the main one. Zeroing the stem's *output* moves the same singularity
to the first block's norm (the depthwise conv of a zero region is 0 again). A mask token after
the stem's norm removes the same information (the regions the 32 px squares cover, in feature
cells: 8x8 cells behind a stride-4 stem) with a non-constant vector, and the sub/main gradient
ratio starts at 0.1-0.5 (measured on convnext_atto, focalnet_tiny_srf, edgenext_xx_small,
mambaout_femto, caformer_s18). The conv and the norm are swapped for wrappers in their own
slots for the sub forward (a swap, not a hook: ``torch.compile`` does not guard on hooks).
Cost: one main forward.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError
from .base import Family, PerModel, register_family
from .mask_token import TOKEN_NAME, ensure_mask_token
from .masks import masked_count, random_mask
from .pixel import check_image_batch, image_of

_STOP = (nn.Linear, nn.MultiheadAttention, nn.Embedding)


def channel_axis(norm: nn.Module) -> int | None:
    """The axis a norm normalises, read from the module, never from a shape: 1 for NCHW norms
    (timm ``LayerNorm2d`` and kin, ``GroupNorm``, Hugging Face ``data_format='channels_first'``),
    -1 for ``nn.LayerNorm`` / RMS norms over the last axis (NHWC maps or (B, N, C) tokens)."""
    fmt = getattr(norm, "data_format", None)
    if fmt in ("channels_first", "channels_last"):
        return 1 if fmt == "channels_first" else -1
    if isinstance(norm, nn.GroupNorm):
        return 1 if norm.num_groups == 1 else None
    name = type(norm).__name__
    if "2d" in name.lower() and ("LayerNorm" in name or "RmsNorm" in name or "SimpleNorm" in name):
        return 1
    if isinstance(norm, nn.LayerNorm) or "LayerNorm" in name or name.lower().startswith("rmsnorm") \
            or name in ("RmsNorm", "RMSNorm", "SimpleNorm"):
        return -1
    return None


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or "Norm" in type(m).__name__


@dataclass(frozen=True)
class StemSite:
    """Where the sub-branch masks: the first conv taking the image, and the norm right after it."""

    conv: str  # dotted path of the conv
    norm: str  # dotted path of the norm whose output is masked
    dim: int  # channels of the norm (the mask token's width)
    axis: int  # the norm's channel axis: 1 (NCHW) or -1 (NHWC, or (B, N, C) tokens)


def _image_channels(model: nn.Module) -> int:
    chans = getattr(model, "in_chans", None) or getattr(getattr(model, "config", None), "num_channels", None)
    return int(chans) if isinstance(chans, int) else 3


def find_stem(model: nn.Module) -> StemSite | None:
    """The first conv that takes the image, followed (before any linear or attention layer) by a
    LayerNorm-like norm in the conv's own block (its parent, or the parent's parent below
    the model), whatever either is called: ``stem`` (timm ConvNeXt), ``patch_embed`` (PVTv2,
    Twins), ``embeddings`` (Hugging Face ConvNeXt, Swin, Segformer). None when the norm after the
    first conv is a BatchNorm (pixel masking is safe there) or there is none."""
    mods = list(model.named_modules())
    chans = _image_channels(model)
    start = next((i for i, (_, m) in enumerate(mods) if isinstance(m, nn.Conv2d) and m.in_channels == chans), None)
    if start is None:
        return None
    conv = mods[start][0]
    parent = conv.rpartition(".")[0]
    grand = parent.rpartition(".")[0] if "." in parent else None
    for i in range(start + 1, len(mods)):
        name, m = mods[i]
        owner = name.rpartition(".")[0]
        # in the conv's own block, or a direct child of the block around it (HF Swin's embeddings.norm)
        inside = (bool(parent) and name.startswith(f"{parent}.")) or (grand is not None and owner == grand) \
            or i == start + 1
        if not inside or isinstance(m, _STOP):
            return None
        if not _is_norm(m) or isinstance(m, nn.Identity):
            continue  # an activation, or a second conv of the same stem (conv-act-conv-norm)
        axis = channel_axis(m)
        shape = getattr(m, "normalized_shape", None)
        dim = shape[0] if shape else getattr(m, "num_channels", None)
        if axis is None or not isinstance(dim, int):
            return None
        return StemSite(conv, name, dim, axis)
    return None


class _RecordSize(nn.Module):
    """The first conv, recording the image size it is given (a 3-d token norm needs it)."""

    def __init__(self, conv: nn.Module, state: dict[str, Any]) -> None:
        super().__init__()
        self.conv = conv
        self._state = state

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._state["hw"] = (x.shape[-2], x.shape[-1])
        return self.conv(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # weight, stride, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.conv, name)


class MaskedNorm(nn.Module):
    """The model's own norm, then the mask token on ``ratio`` of the regions its output covers
    for each ``region_px`` x ``region_px`` square of the image, along the norm's own channel
    axis. One per model."""

    def __init__(self, norm: nn.Module, model: nn.Module, site: StemSite, region_px: int,
                 state: dict[str, Any]) -> None:
        super().__init__()
        self.norm = norm
        self._model = [model]  # not a submodule: the model owns the wrapper, not the reverse
        self.axis = site.axis
        self.region_px = region_px
        self._state = state
        self.ratio = 0.0

    def _grid(self, out: Tensor) -> tuple[int, int]:
        if out.ndim == 4:
            return (out.shape[2], out.shape[3]) if self.axis == 1 else (out.shape[1], out.shape[2])
        if out.ndim == 3 and self.axis == -1 and "hw" in self._state:  # (B, h*w, C) tokens, row-major
            hh, ww = self._state["hw"]
            stride = math.isqrt(hh * ww // out.shape[1]) if out.shape[1] else 0
            if stride and (hh // stride) * (ww // stride) == out.shape[1]:
                return hh // stride, ww // stride
        raise MaskSubError(f"cannot lay the stem norm's output {tuple(out.shape)} on an image grid; use mask_fn=")

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.norm(x, *args, **kwargs)
        token = getattr(self._model[0], TOKEN_NAME)
        h, w = self._grid(out)
        hh, ww = self._state.get("hw", (h, w))
        stride = hh // h
        if stride < 1 or hh != h * stride or ww != w * stride or self.region_px % stride:
            raise MaskSubError(
                f"the stem maps {hh}x{ww} pixels to {h}x{w} cells, which does not tile "
                f"{self.region_px} px mask regions; use an image size that is a multiple of {self.region_px}"
            )
        r = self.region_px // stride  # cells per region side
        b = out.shape[0]
        m = random_mask(b, (h // r) * (w // r), self.ratio, out.device).view(b, h // r, 1, w // r, 1)
        m = m.expand(-1, -1, r, -1, r).reshape(b, h, w)
        tok = token.to(out.dtype)
        if out.ndim == 3:
            return torch.where(m.view(b, h * w, 1), tok, out)
        if self.axis == -1:
            return torch.where(m.unsqueeze(-1), tok, out)
        return torch.where(m.unsqueeze(1), tok.view(1, -1, 1, 1), out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.norm, name)


@register_family
class StemMaskToken(Family):
    """A CNN whose ``stem`` (timm) or ``embeddings`` (Hugging Face ConvNeXt) is a conv ending in
    a LayerNorm: mask token on 32 px regions after the stem.

    Option: ``region_px`` (pixels per mask region side, default 32; a multiple of the stem stride).
    """

    name = "stem"
    adds_parameters = True
    priority = 200  # before the pixel fallback
    why = ("its first conv is followed by a LayerNorm (stem or patch embedding, whatever its name): "
           "zeroed pixels would make that norm divide by sqrt(eps)")

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
    def _stem(model: nn.Module) -> StemSite:
        found = find_stem(model)
        if found is None:
            raise MaskSubError(
                f"{type(model).__name__} has no conv followed by a LayerNorm (a stem or patch embedding) "
                "for the 'stem' family; use family='pixel' or mask_fn="
            )
        return found

    def prepare(self, model: nn.Module) -> None:
        ensure_mask_token(model, self._stem(model).dim)

    def validate(self, model: nn.Module, x: Any) -> None:
        check_image_batch(x, "the stem sub-branch", self.region_px)

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        img = image_of(x)
        if img is None or img.ndim != 4:
            return super().describe(model, ratio, x)
        px = self.region_px
        n = (img.shape[-2] // px) * (img.shape[-1] // px)
        return (f"{masked_count(n, ratio)} of {n} {px}x{px} px squares replaced by a mask token after the "
                f"norm of the first conv ({self._stem(model).norm})")

    def _make(self, model: nn.Module) -> tuple[StemSite, _RecordSize, MaskedNorm]:
        site = self._stem(model)
        state: dict[str, Any] = {}
        return (site, _RecordSize(model.get_submodule(site.conv), state),
                MaskedNorm(model.get_submodule(site.norm), model, site, self.region_px, state))

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        if getattr(model, TOKEN_NAME, None) is None:
            warnings.warn(
                "the mask token was created inside the sub-branch context and is not in your "
                "optimizer; build MaskSub (or call masksub.prepare) before the optimizer", stacklevel=3)
            self.prepare(model)
        site, record, masked = self._wrappers.get(model, self._make)
        masked.ratio = ratio
        swaps = [(site.conv, record, "conv"), (site.norm, masked, "norm")]
        done: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for path, wrapper, attr in swaps:
                owner_path, _, name = path.rpartition(".")
                owner = model.get_submodule(owner_path) if owner_path else model
                own = owner._modules[name]
                if getattr(wrapper, attr) is not own:  # the slot was given another module since
                    setattr(wrapper, attr, own)
                done.append((owner, name, own))
                owner._modules[name] = wrapper
            yield
        finally:
            for owner, name, own in reversed(done):
                owner._modules[name] = own
