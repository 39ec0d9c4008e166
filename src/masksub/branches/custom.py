"""A user's own sub-branch: a ``mask_fn(model, x, ratio)`` or a ``forward(x, mask_ratio=...)``."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ..errors import MaskSubError
from .base import Family, forward_pre_hook, register_family


@register_family
class CustomMask(Family):
    """``mask_fn(model, x, ratio) -> x_masked`` applied to the input, or, without one, the
    model's own ``mask_ratio`` forward argument (``ratio_arg=`` names another)."""

    name = "custom"
    priority = 850
    why = "the model's forward takes mask_ratio (or mask_fn= was given)"
    masks_ratio = False  # the user's mask_fn decides what the ratio means

    def __init__(self, mask_fn: Callable[[nn.Module, Any, float], Any] | None = None,
                 ratio_arg: str = "mask_ratio", **options: Any) -> None:
        super().__init__(**options)
        if mask_fn is not None and not callable(mask_fn):
            raise MaskSubError(f"mask_fn must be callable (model, x, ratio) -> x, got {type(mask_fn).__name__}")
        self.mask_fn = mask_fn
        self.ratio_arg = ratio_arg

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        try:
            return "mask_ratio" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return False

    def prepare(self, model: nn.Module) -> None:
        if self.mask_fn is None:
            try:
                params = inspect.signature(model.forward).parameters
            except (TypeError, ValueError):
                params = {}
            if self.ratio_arg not in params:
                raise MaskSubError(
                    f"family 'custom' needs mask_fn=fn(model, x, ratio) or a model forward with a "
                    f"{self.ratio_arg!r} argument; {type(model).__name__}.forward has neither"
                )

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            if self.mask_fn is not None:
                return (self.mask_fn(module, args[0], ratio), *args[1:]), kwargs
            return args, {**kwargs, self.ratio_arg: ratio}

        with forward_pre_hook(model, hook):
            yield
