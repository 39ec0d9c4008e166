"""DropSub and PathSub: the sub-branch is the same model with heavier dropout / drop-path.

Rates are changed on the model's own modules for the sub forward and put back afterwards,
also when the forward raises. Works for any model: timm, Hugging Face, a user's own.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from ..errors import MaskSubError
from .base import Family, PerModel

# Layers that read a float rate instead of an nn.Dropout module: Hugging Face attention
# (``dropout_prob``, ``attention_dropout``) and timm heads calling F.dropout (``drop_rate``).
_FLOAT_DROPOUT_ATTRS = ("dropout_prob", "attention_dropout", "drop_rate")
_DROP_PATH_SLOT = re.compile(r"^drop_path\d*$")


def _dropout_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every dropout rate in the model."""
    slots = []
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            slots.append((m, "p"))
        for attr in _FLOAT_DROPOUT_ATTRS:
            if isinstance(m.__dict__.get(attr), float):
                slots.append((m, attr))
    return slots


def _drop_path_attr(m: nn.Module) -> str | None:
    """The rate attribute of a drop-path module: timm / HF ``*DropPath.drop_prob``,
    torchvision ``StochasticDepth.p``."""
    name = type(m).__name__
    if name.endswith("DropPath") and isinstance(getattr(m, "drop_prob", None), float):
        return "drop_prob"
    if name == "StochasticDepth" and isinstance(getattr(m, "p", None), float):
        return "p"
    return None


@contextlib.contextmanager
def _set_rates(changes: Iterable[tuple[nn.Module, str, float]]) -> Iterator[None]:
    """Set each ``(module, attribute, rate)``; every old rate is back on exit, also on error."""
    saved: list[tuple[nn.Module, str, float]] = []
    try:
        for m, attr, rate in changes:
            saved.append((m, attr, getattr(m, attr)))
            setattr(m, attr, rate)
        yield
    finally:
        for m, attr, old in reversed(saved):
            setattr(m, attr, old)


def _require_train(model: nn.Module, what: str) -> None:
    """In eval() dropout and drop-path do nothing: the sub-branch would be the main branch, silently."""
    if not model.training:
        raise MaskSubError(
            f"{type(model).__name__} is in eval(): {what} does nothing there, so the {what} sub-branch would "
            "equal the main branch; call model.train() before the MaskSub step (or use mode='mask')"
        )


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

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._slots = PerModel()

    def prepare(self, model: nn.Module) -> None:
        if not self._slots.get(model, _dropout_slots):
            raise MaskSubError(
                f"{type(model).__name__} has no dropout module for DropSub to raise; build it with "
                "its dropout layers (timm: drop_rate / proj_drop_rate; HF: hidden_dropout_prob) or use mode='mask'"
            )

    def validate(self, model: nn.Module, x: Any) -> None:
        _require_train(model, "dropout")

    def apply(self, model: nn.Module, ratio: float) -> contextlib.AbstractContextManager:
        _require_train(model, "dropout")
        return _set_rates((m, a, ratio) for m, a in self._slots.get(model, _dropout_slots))


def _drop_path_slots(model: nn.Module) -> tuple[list[tuple[nn.Module, str]], list[tuple[nn.Module, str]]]:
    """(module, rate attribute) of every drop-path, and the empty ``drop_path*`` slots
    (``nn.Identity`` or ``None``) timm leaves where the schedule gave rate 0."""
    paths = [(m, a) for m in model.modules() if (a := _drop_path_attr(m)) is not None]
    empty = []
    for m in model.modules():
        for name, child in list(m._modules.items()) + [(k, v) for k, v in m.__dict__.items() if v is None]:
            if _DROP_PATH_SLOT.match(name) and (child is None or type(child) is nn.Identity):
                empty.append((m, name))
    return paths, empty


class PathSub(Family):
    """Every drop-path at its own rate plus ``delta`` (the ratio; paper +0.1).

    Blocks whose schedule gave rate 0 hold ``nn.Identity`` or ``None`` in their ``drop_path``
    slots (timm); those get a ``DropPath(delta)`` for the sub forward so *every* block is raised.
    """

    name = "droppath"
    modes = ("droppath",)
    default_ratio = 0.1

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._slots = PerModel()
        self._fill = DropPath(0.0)

    def prepare(self, model: nn.Module) -> None:
        paths, empty = self._slots.get(model, _drop_path_slots)
        if not paths and not empty:
            raise MaskSubError(
                f"{type(model).__name__} has no drop-path (stochastic depth) for PathSub to raise; "
                "build it with drop_path_rate > 0 (timm) or use mode='mask' / 'dropout'"
            )

    def check(self, model: nn.Module, ratio: float) -> None:
        paths, _ = self._slots.get(model, _drop_path_slots)
        bad = [getattr(m, a) for m, a in paths if getattr(m, a) + ratio >= 1.0]
        if bad:
            raise MaskSubError(f"drop-path {max(bad)} + delta {ratio} reaches 1; use a smaller delta (ratio)")

    def validate(self, model: nn.Module, x: Any) -> None:
        _require_train(model, "drop-path")

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        _require_train(model, "drop-path")
        paths, empty = self._slots.get(model, _drop_path_slots)
        self.check(model, ratio)
        fill = self._fill  # stateless: one serves every slot, and every step
        fill.drop_prob = ratio
        fill.train(model.training)
        swapped: list[tuple[nn.Module, str, Any, bool]] = []
        with _set_rates((m, a, getattr(m, a) + ratio) for m, a in paths):
            try:
                for m, name in empty:
                    in_modules = name in m._modules
                    old = m._modules[name] if in_modules else m.__dict__.pop(name)
                    swapped.append((m, name, old, in_modules))
                    m._modules[name] = fill
                yield
            finally:
                for m, name, old, in_modules in reversed(swapped):
                    if in_modules:
                        m._modules[name] = old
                    else:
                        del m._modules[name]
                        m.__dict__[name] = old
