"""DropSub and PathSub: the sub-branch is the same model with heavier dropout / drop-path.

Rates are changed on the model's own modules for the sub forward and put back afterwards,
also when the forward raises. Works for any model: timm, Hugging Face, a user's own.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from ..errors import MaskSubError
from .base import Family

# Layers that read a float rate instead of an nn.Dropout module: Hugging Face attention
# (``dropout_prob``, ``attention_dropout``) and timm heads calling F.dropout (``drop_rate``).
_FLOAT_DROPOUT_ATTRS = ("dropout_prob", "attention_dropout", "drop_rate")


def _has_dropout(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.dropout._DropoutNd)
        or any(isinstance(m.__dict__.get(a), float) for a in _FLOAT_DROPOUT_ATTRS)
        for m in model.modules()
    )
_DROP_PATH_SLOT = re.compile(r"^drop_path\d*$")


def _is_drop_path(m: nn.Module) -> bool:
    return type(m).__name__ == "DropPath" and hasattr(m, "drop_prob")


class DropPath(nn.Module):
    """Stochastic depth on the batch dimension, for slots a model left empty at rate 0."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropSub(Family):
    """Every dropout at ``p_sub`` (the ratio; paper 0.2) for the sub forward."""

    name = "dropout"
    modes = ("dropout",)
    default_ratio = 0.2

    def prepare(self, model: nn.Module) -> None:
        if not _has_dropout(model):
            raise MaskSubError(
                f"{type(model).__name__} has no dropout module for DropSub to raise; build it with "
                "its dropout layers (timm: drop_rate / proj_drop_rate; HF: hidden_dropout_prob) or use mode='mask'"
            )

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        saved: list[tuple[Any, str, float]] = []
        try:
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    saved.append((m, "p", m.p))
                    m.p = ratio
                for attr in _FLOAT_DROPOUT_ATTRS:
                    v = m.__dict__.get(attr)
                    if isinstance(v, float):
                        saved.append((m, attr, v))
                        setattr(m, attr, ratio)
            yield
        finally:
            for m, attr, v in reversed(saved):
                setattr(m, attr, v)


class PathSub(Family):
    """Every drop-path at its own rate plus ``delta`` (the ratio; paper +0.1).

    Blocks whose schedule gave rate 0 hold ``nn.Identity`` or ``None`` in their ``drop_path``
    slots (timm); those get a ``DropPath(delta)`` for the sub forward so *every* block is raised.
    """

    name = "droppath"
    modes = ("droppath",)
    default_ratio = 0.1

    def _slots(self, model: nn.Module) -> tuple[list[nn.Module], list[tuple[nn.Module, str]]]:
        paths = [m for m in model.modules() if _is_drop_path(m)]
        empty = []
        for m in model.modules():
            for name, child in list(m._modules.items()) + [(k, v) for k, v in m.__dict__.items() if v is None]:
                if _DROP_PATH_SLOT.match(name) and (child is None or type(child) is nn.Identity):
                    empty.append((m, name))
        return paths, empty

    def prepare(self, model: nn.Module) -> None:
        paths, empty = self._slots(model)
        if not paths and not empty:
            raise MaskSubError(
                f"{type(model).__name__} has no drop-path (stochastic depth) for PathSub to raise; "
                "build it with drop_path_rate > 0 (timm) or use mode='mask' / 'dropout'"
            )

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        paths, empty = self._slots(model)
        bad = [m.drop_prob for m in paths if m.drop_prob + ratio >= 1.0]
        if bad:
            raise MaskSubError(f"drop-path {max(bad)} + delta {ratio} reaches 1; use a smaller delta (ratio)")
        saved: list[tuple[nn.Module, float]] = []
        swapped: list[tuple[nn.Module, str, Any, bool]] = []
        try:
            for m in paths:
                saved.append((m, m.drop_prob))
                m.drop_prob = m.drop_prob + ratio
            for m, name in empty:
                in_modules = name in m._modules
                old = m._modules[name] if in_modules else m.__dict__.pop(name)
                swapped.append((m, name, old, in_modules))
                m._modules[name] = DropPath(ratio)
            yield
        finally:
            for m, p in saved:
                m.drop_prob = p
            for m, name, old, in_modules in reversed(swapped):
                if in_modules:
                    m._modules[name] = old
                else:
                    del m._modules[name]
                    m.__dict__[name] = old
