"""ViT token removal (MAE style), through timm's own ``patch_drop`` slot.

timm's VisionTransformer calls ``self.patch_drop(x)`` right after position embedding, with
the prefix tokens (class, registers) first. For the sub forward that slot holds a
``TokenRemoval`` that keeps the prefix and a random ``1 - ratio`` of the patch tokens, so the
blocks run on about half the tokens: the sub-branch costs about half a main forward.
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
from .drop import _require_train
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


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def token_grid(embed: nn.Module, h: int, w: int) -> tuple[int, int] | None:
    """The patch-token grid a patch embedding makes of an h x w image: its patch size times the
    feature stride of a hybrid's conv backbone (timm ``HybridEmbed.feature_ratio``)."""
    ps = getattr(embed, "patch_size", None)
    if ps is None:
        return None
    fr = _pair(getattr(embed, "feature_ratio", None) or 1)
    ps = _pair(ps)
    return h // (ps[0] * fr[0]), w // (ps[1] * fr[1])


def _removal_words(n: int, ratio: float, prefix: int, hybrid: bool = False) -> str:
    where = " after the conv stem, which runs on the whole image" if hybrid else ""
    return f"keeps {kept_count(n, ratio)} of {n} patch tokens (+{prefix} prefix token(s)){where}; the rest removed"


@register_family
class ViTTokenRemoval(Family):
    """timm ``VisionTransformer`` and subclasses (DeiT-III, MAE / CLIP finetune), timm ``Eva``,
    ``NaFlexVit``: drop tokens. A hybrid (a conv backbone as patch embedding, timm
    ``HybridEmbed``: ViTamin, R50-ViT) removes tokens after its conv stem, which runs in full."""

    name = "vit"
    priority = 600
    why = "has timm's patch_drop slot after the position embedding (VisionTransformer, Eva, NaFlexVit)"
    cost = 0.5

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (("patch_drop" in model._modules or "patch_drop" in model.__dict__)
                and (hasattr(model, "patch_embed") or hasattr(model, "embeds"))
                and isinstance(getattr(model, "num_prefix_tokens", None), int))

    @staticmethod
    def _embed(model: nn.Module) -> nn.Module | None:
        pe = getattr(model, "patch_embed", None)
        if pe is None:  # NaFlexVit: self.embeds.patch_size
            pe = getattr(model, "embeds", None)
        return pe if isinstance(pe, nn.Module) else None

    @classmethod
    def hybrid(cls, model: nn.Module) -> bool:
        """A conv backbone makes the tokens (timm HybridEmbed): it runs on every pixel."""
        return isinstance(getattr(cls._embed(model), "backbone", None), nn.Module)

    def expected_cost(self, model: nn.Module) -> float:
        return 1.0 if self.hybrid(model) else self.cost

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        pe = self._embed(model)
        grid = token_grid(pe, x.shape[-2], x.shape[-1]) if isinstance(x, Tensor) and x.ndim == 4 and pe else None
        if not grid:
            return super().describe(model, ratio, x)
        words = _removal_words(grid[0] * grid[1], ratio, int(model.num_prefix_tokens), self.hybrid(model))
        return words + (" (the conv stem's cost stays: between 0.5x and 1x)" if self.hybrid(model) else "")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._removal = PerModel()  # one module per model: compiled graphs see the same one

    def validate(self, model: nn.Module, x: Any) -> None:
        pe = getattr(model, "patch_embed", None)
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
        in_modules = "patch_drop" in model._modules  # timm Eva keeps a plain None attribute
        old = model.patch_drop
        removal = self._removal.get(model, self._make_removal)
        removal.ratio = ratio
        if not in_modules:
            del model.__dict__["patch_drop"]
        model._modules["patch_drop"] = removal
        try:
            yield
        finally:
            if in_modules:
                model._modules["patch_drop"] = old
            else:
                del model._modules["patch_drop"]
                model.__dict__["patch_drop"] = old


class _ThenRemove(nn.Module):
    """The slot's own module (Hugging Face's embedding dropout), then token removal."""

    def __init__(self, first: nn.Module, removal: TokenRemoval) -> None:
        super().__init__()
        self.first = first
        self.removal = removal

    def forward(self, x: Tensor) -> Tensor:
        return self.removal(self.first(x))


HF_VIT_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers")


def _hf_vit_embeddings(model: nn.Module) -> nn.Module | None:
    """The ``embeddings`` module of a Hugging Face ViT / DeiT (absolute position embedding,
    class (+ distillation) token first, then ``self.dropout``), else None."""
    if not type(model).__module__.startswith("transformers."):
        return None
    if getattr(getattr(model, "config", None), "model_type", None) not in HF_VIT_TYPES:
        return None
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] == "embeddings" and hasattr(m, "patch_embeddings") \
                and hasattr(m, "cls_token") and isinstance(getattr(m, "dropout", None), nn.Module):
            return m
    return None


class SlotTokenRemoval(Family):
    """Token removal in a module slot that a model runs right after its position embedding
    (the slot's own module runs first). Subclasses say where: ``slot(model) -> (owner, attribute,
    prefix tokens)`` or None, and ``grid(model, h, w)``: the patch-token grid of an image."""

    name = "slot_removal"
    cost = 0.5

    @staticmethod
    def grid(model: nn.Module, h: int, w: int) -> tuple[int, int] | None:
        return None

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        img = x.get("pixel_values") if isinstance(x, dict) else x
        where = self.slot(model)
        grid = self.grid(model, img.shape[-2], img.shape[-1]) if isinstance(img, Tensor) and img.ndim == 4 else None
        if where is None or not grid:
            return super().describe(model, ratio, x)
        return _removal_words(grid[0] * grid[1], ratio, where[2])

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._wrap = PerModel()

    @staticmethod
    def slot(model: nn.Module) -> tuple[nn.Module, str, int] | None:
        return None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return cls.slot(model) is not None

    def _where(self, model: nn.Module) -> tuple[nn.Module, str, int]:
        where = self.slot(model)
        if where is None:
            raise MaskSubError(f"{type(model).__name__} has no slot for the {self.name!r} family; pick another family")
        return where

    def validate(self, model: nn.Module, x: Any) -> None:
        self._where(model)

    def _make(self, model: nn.Module) -> _ThenRemove:
        owner, attr, prefix = self._where(model)
        return _ThenRemove(owner._modules[attr], TokenRemoval(0.0, prefix))

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        owner, attr, _ = self._where(model)
        old = owner._modules[attr]
        wrap = self._wrap.get(model, self._make)
        wrap.first = old
        wrap.removal.ratio = ratio
        owner._modules[attr] = wrap
        try:
            yield
        finally:
            owner._modules[attr] = old


@register_family
class HFViTTokenRemoval(SlotTokenRemoval):
    """Hugging Face ``ViTForImageClassification`` / DeiT / Dinov2: MAE-style token removal in the
    embeddings' own ``dropout`` slot (right after the position embedding); the class,
    distillation and register tokens are kept. Cost ~0.5x a main forward at r=0.5."""

    name = "hf_vit"
    priority = 630
    why = ("a Hugging Face ViT / DeiT / Dinov2: absolute position embedding, then a dropout slot to "
           "remove tokens in")

    @staticmethod
    def slot(model: nn.Module) -> tuple[nn.Module, str, int] | None:
        emb = _hf_vit_embeddings(model)
        if emb is None:
            return None
        reg = getattr(emb, "register_tokens", None)
        prefix = 1 + int(getattr(emb, "distillation_token", None) is not None) + (reg.shape[1] if reg is not None else 0)
        return emb, "dropout", prefix

    @staticmethod
    def grid(model: nn.Module, h: int, w: int) -> tuple[int, int] | None:
        emb = _hf_vit_embeddings(model)
        return token_grid(emb.patch_embeddings, h, w) if emb is not None else None


@register_family
class CaitTokenRemoval(SlotTokenRemoval):
    """timm ``Cait``: token removal in its ``pos_drop`` slot (after the position embedding; the
    class token joins later, in the class-attention blocks). Cost ~0.5x at r=0.5."""

    name = "cait"
    priority = 640
    why = "a timm Cait: its pos_drop slot runs after the position embedding, before any class token"

    @staticmethod
    def grid(model: nn.Module, h: int, w: int) -> tuple[int, int] | None:
        return token_grid(model.patch_embed, h, w)

    @staticmethod
    def slot(model: nn.Module) -> tuple[nn.Module, str, int] | None:
        if class_name(model) == "Cait" and isinstance(model._modules.get("pos_drop"), nn.Module):
            return model, "pos_drop", 0
        return None


@register_family
class HieraTokenRemoval(Family):
    """timm ``Hiera``: its own mask-unit patch dropout (``patch_drop_rate``, read by
    ``forward_features`` in training) at the mask ratio for the sub forward. A mask unit is 8x8
    tokens (32x32 px at patch 4): the paper's 32 px regions, removed, so the sub forward costs
    ~0.5x. Hiera keeps ``int(n * (1 - ratio))`` units (it rounds down what it keeps)."""

    name = "hiera"
    priority = 650
    why = "a timm Hiera: its own mask-unit patch dropout (patch_drop_rate) removes 32 px units"
    cost = 0.5
    masks_in_training_only = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return class_name(model) == "Hiera" and isinstance(getattr(model, "patch_drop_rate", None), float)

    def check(self, model: nn.Module, ratio: float) -> None:
        if getattr(model, "patch_drop_rate", 0.0):
            raise MaskSubError(
                f"{type(model).__name__} was built with patch_drop_rate={model.patch_drop_rate:.4g}: the main branch "
                "would drop mask units too; build it with patch_drop_rate=0 for MaskSub")

    def validate(self, model: nn.Module, x: Any) -> None:
        _require_train(model, "Hiera's patch dropout")

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        n = math.prod(model.mask_spatial_shape)
        unit = "x".join(map(str, model.mask_unit_size))
        return f"keeps {int(n * (1 - ratio))} of {n} mask units ({unit} tokens each); the rest removed"

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        _require_train(model, "Hiera's patch dropout")  # read only in training
        old = model.patch_drop_rate
        model.patch_drop_rate = float(ratio)
        try:
            yield
        finally:
            model.patch_drop_rate = old


@register_family
class OpenClipTokenRemoval(ViTTokenRemoval):
    """open_clip's ``VisionTransformer`` tower (detected by its attributes; open_clip is never
    imported): the same token removal in its own ``patch_dropout`` slot, which it applies right
    after the position embedding, class token first, in train mode."""

    name = "open_clip_vit"
    priority = 900
    why = "an open_clip VisionTransformer tower: its patch_dropout slot runs after the position embedding"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("patch_dropout", "positional_embedding", "conv1", "transformer"))

    @staticmethod
    def _embed(model: nn.Module) -> nn.Module | None:
        return model.conv1

    def expected_cost(self, model: nn.Module) -> float:
        return self.cost

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        if not (isinstance(x, Tensor) and x.ndim == 4):
            return Family.describe(self, model, ratio, x)
        ps = _pair(model.conv1.stride)
        n = (x.shape[-2] // ps[0]) * (x.shape[-1] // ps[1])
        return _removal_words(n, ratio, 0 if getattr(model, "class_embedding", None) is None else 1)

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
