"""Mask-token sub-branches: masked patch tokens are *replaced* by a learnable token.

Used where tokens cannot be removed: BEiT v2 finetuning (relative position bias over a fixed
grid) and Swin (windows over a fixed grid). A wrapper swapped into the model's own
``patch_embed`` slot replaces the masked tokens, so the rest of the model runs untouched; the cost
equals a main forward. The mask token is the one parameter MaskSub adds; it is registered on
the model as ``masksub_mask_token`` (so ``model.parameters()`` and checkpoints carry it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError
from .base import Family, PerModel, class_name, register_family
from .masks import block_mask, masked_count, random_mask

TOKEN_NAME = "masksub_mask_token"


def _patch_size(model: nn.Module) -> int:
    ps = getattr(model.patch_embed, "patch_size", 16)
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def _embed_dim(model: nn.Module) -> int:
    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, (nn.Conv2d, nn.Linear)):
        return proj.out_channels if isinstance(proj, nn.Conv2d) else proj.out_features
    dim = getattr(model, "embed_dim", None)
    if isinstance(dim, (list, tuple)):
        dim = dim[0]
    if not isinstance(dim, int):
        raise MaskSubError(f"cannot tell the token width of {type(model).__name__}'s patch_embed for the mask token")
    return dim


def _channels_first(model: nn.Module, out: Tensor) -> bool:
    """A 4-d patch_embed output is NHWC (timm Swin) or NCHW (SwinV2Cr); timm says which in
    ``patch_embed.output_fmt`` or by the model class, otherwise the token width decides."""
    fmt = getattr(model.patch_embed, "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)
    if fmt in ("NCHW", "NHWC"):
        return fmt == "NCHW"
    if class_name(model) == "SwinTransformerV2Cr":  # its own PatchEmbed, always NCHW
        return True
    dim = getattr(model, TOKEN_NAME).shape[0]
    return out.shape[-1] != dim and out.shape[1] == dim


def ensure_mask_token(model: nn.Module, dim: int) -> nn.Parameter:
    token = getattr(model, TOKEN_NAME, None)
    if token is None:
        ref = next(model.parameters())
        # Own generator: adding the token must not shift the global RNG stream, so a MaskSub
        # run and its baseline draw the same data order and augmentations.
        value = torch.empty(dim)
        nn.init.trunc_normal_(value, std=0.02, generator=torch.Generator().manual_seed(dim))
        token = nn.Parameter(value.to(device=ref.device, dtype=ref.dtype))
        model.register_parameter(TOKEN_NAME, token)
    return token


@register_family
class MaskTokenFamily(Family):
    """Replace masked patch tokens by a learnable token, in regions of ``region_px`` pixels.

    Options: ``region_px`` (pixels per mask region side; default one patch, Swin 32),
    ``block`` (BEiT-style block-wise masking instead of independent regions).
    """

    name = "vit_token"
    adds_parameters = True
    priority = 700
    why = "chosen by family='vit_token'"
    region_px_default: int | None = None  # None: one patch

    def __init__(self, region_px: int | None = None, block: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self._wrappers = PerModel()
        self.region_px = region_px if region_px is not None else self.region_px_default
        self.block = bool(block)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False  # opt-in for ViTs (family="vit_token"); subclasses match BEiT and Swin

    def region_tokens(self, model: nn.Module) -> int:
        patch = _patch_size(model)
        px = self.region_px or patch
        if px % patch:
            raise MaskSubError(f"mask region of {px} px is not a multiple of the {patch} px patch; use a multiple of {patch}")
        return px // patch

    def prepare(self, model: nn.Module) -> None:
        ensure_mask_token(model, _embed_dim(model))
        img = getattr(model.patch_embed, "img_size", None)
        if img is not None:
            self._check_size(model, tuple(img) if isinstance(img, (tuple, list)) else (img, img))

    def _check_size(self, model: nn.Module, hw: tuple[int, int]) -> None:
        r = self.region_tokens(model) * _patch_size(model)
        if hw[0] % r or hw[1] % r:
            raise MaskSubError(
                f"image size {hw[0]}x{hw[1]} is not divisible by the {r} px mask region of the "
                f"{self.name} sub-branch; use an image size that is a multiple of {r} or set region_px"
            )

    def validate(self, model: nn.Module, x: Any) -> None:
        if isinstance(x, Tensor) and x.ndim == 4:
            self._check_size(model, (x.shape[-2], x.shape[-1]))

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        ps = _patch_size(model) if hasattr(model, "patch_embed") else None
        if not (isinstance(x, Tensor) and x.ndim == 4 and ps):
            return super().describe(model, ratio, x)
        r = self.region_tokens(model)
        n = (x.shape[-2] // ps // r) * (x.shape[-1] // ps // r)
        return f"{masked_count(n, ratio)} of {n} regions of {r}x{r} patch tokens replaced by a mask token"

    def _grid(self, model: nn.Module, out: Tensor) -> tuple[int, int]:
        if out.ndim == 4:
            return (out.shape[2], out.shape[3]) if _channels_first(model, out) else (out.shape[1], out.shape[2])
        n = out.shape[1]
        grid = getattr(model.patch_embed, "grid_size", None)
        if grid is not None and grid[0] * grid[1] == n:
            return int(grid[0]), int(grid[1])
        side = math.isqrt(n)
        if side * side != n:
            raise MaskSubError(f"cannot lay {n} patch tokens on a grid; pass a square image or use family='vit'")
        return side, side

    def make_mask(self, model: nn.Module, batch: int, grid: tuple[int, int], ratio: float, device: torch.device) -> Tensor:
        r = self.region_tokens(model)
        if grid[0] % r or grid[1] % r:
            raise MaskSubError(f"token grid {grid} is not divisible by mask regions of {r} tokens")
        rg = (grid[0] // r, grid[1] // r)
        if self.block:
            m = block_mask(batch, rg, ratio, device)
        else:
            m = random_mask(batch, rg[0] * rg[1], ratio, device)
        m = m.view(batch, rg[0], 1, rg[1], 1).expand(-1, -1, r, -1, r)
        return m.reshape(batch, grid[0], grid[1])

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        token = getattr(model, TOKEN_NAME, None)
        if token is None:
            if hasattr(model, "set_requires_gradient_sync"):
                raise MaskSubError(
                    "the mask token must be added before fully_shard (FSDP2 would neither shard nor "
                    "reduce it); call masksub.prepare(model, 'mask') or build MaskSub before sharding")
            import warnings

            warnings.warn(
                "the mask token was created inside the sub-branch context and is not in your "
                "optimizer; build MaskSub (or call masksub.prepare) before the optimizer", stacklevel=3)
            self.prepare(model)
            token = getattr(model, TOKEN_NAME)

        wrapper = self._wrappers.get(model, self._make_wrapper)
        wrapper.ratio = ratio
        embed = model.patch_embed
        if wrapper.embed is not embed:  # the slot was given another module since
            wrapper.embed = embed
        model.patch_embed = wrapper
        try:
            yield
        finally:
            model.patch_embed = embed

    def _make_wrapper(self, model: nn.Module) -> MaskedPatchEmbed:
        def mask_output(out: Tensor, ratio: float) -> Tensor:
            token = getattr(model, TOKEN_NAME)
            grid = self._grid(model, out)
            mask = self.make_mask(model, out.shape[0], grid, ratio, out.device)
            if out.ndim == 4 and _channels_first(model, out):  # NCHW (timm SwinTransformerV2Cr)
                return torch.where(mask.unsqueeze(1), token.to(out.dtype).view(1, -1, 1, 1), out)
            mask = mask.view(out.shape[0], *out.shape[1:-1], 1)
            return torch.where(mask, token.to(out.dtype), out)

        return MaskedPatchEmbed(model.patch_embed, mask_output)


class MaskedPatchEmbed(nn.Module):
    """The model's own ``patch_embed`` followed by the masking, swapped into the slot for the
    sub forward. A swap, not a forward hook: ``torch.compile`` does not guard on hooks, so a
    hooked sub forward would silently reuse the main forward's graph and run unmasked. One
    instance per model, so compiled graphs see the same module every step."""

    def __init__(self, embed: nn.Module, mask_output: Any) -> None:
        super().__init__()
        self.embed = embed
        self.mask_output = mask_output
        self.ratio = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.mask_output(self.embed(*args, **kwargs), self.ratio)

    def __getattr__(self, name: str) -> Any:  # patch_size, grid_size, output_fmt, proj ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.embed, name)


@register_family
class BeitMaskToken(MaskTokenFamily):
    """timm ``Beit`` (BEiT v2 finetuning): mask token, random (or ``block=True``) masking."""

    name = "beit"
    priority = 730
    why = "a timm Beit: relative position bias over a fixed grid, tokens cannot be removed"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name(model) == "Beit" and hasattr(model, "patch_embed")


@register_family
class SwinMaskToken(MaskTokenFamily):
    """timm ``SwinTransformer``, V2 and V2Cr: mask token on 32x32-pixel regions."""

    name = "swin"
    priority = 740
    why = "a timm SwinTransformer: windows over a fixed grid, tokens cannot be removed"
    region_px_default = 32

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name(model).startswith("SwinTransformer") and hasattr(model, "patch_embed")


@register_family
class RelPosMaskToken(MaskTokenFamily):
    """timm ``VisionTransformerRelPos``: relative position bias over a fixed token grid, so
    tokens are replaced by a mask token (one patch per region, as BEiT), not removed. Cost 1x."""

    name = "vit_relpos"
    priority = 750
    why = "a timm VisionTransformerRelPos: relative position bias over a fixed grid, tokens cannot be removed"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name(model) == "VisionTransformerRelPos" and hasattr(model, "patch_embed")
