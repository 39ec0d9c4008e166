"""Core changes proposed by the benchmark, written as opt-in families so the bench can time and
check them beside the core's own without editing the core.

``swin_swap``: the Swin (mask-token) sub-branch attached by *swapping* ``model.patch_embed``
for a wrapper module during the sub forward instead of adding a forward hook. Under
``torch.compile`` Dynamo does not guard on module hooks (``skip_nnmodule_hook_guards`` is True
by default), so a hook added for the sub forward is ignored by the graph compiled for the main
forward: the compiled sub-branch silently runs unmasked. A module swap is guarded (as the ViT
family's ``patch_drop`` swap is), so Dynamo compiles a second graph for the sub forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from .branches import family_names, register_family
from .branches.mask_token import SwinMaskToken


class _Handle:
    def __init__(self, owner: HookedEmbed) -> None:
        self.owner = owner

    def remove(self) -> None:
        self.owner.fn = None


class HookedEmbed(nn.Module):
    """``patch_embed`` followed by the family's output hook, as one module Dynamo can see."""

    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed
        self.fn: Callable[..., Any] | None = None

    def register_forward_hook(self, hook: Callable[..., Any], **_: Any) -> _Handle:  # type: ignore[override]
        self.fn = hook
        return _Handle(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.embed(*args, **kwargs)
        return out if self.fn is None else self.fn(self.embed, args, out)

    def __getattr__(self, name: str) -> Any:  # patch_size, grid_size, output_fmt, proj ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.embed, name)


class SwinMaskTokenSwap(SwinMaskToken):
    """The core's Swin sub-branch, attached by a module swap (compile-safe). Opt-in only."""

    name = "swin_swap"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        embed = model.patch_embed
        model.patch_embed = HookedEmbed(embed)
        try:
            with super().apply(model, ratio):
                yield
        finally:
            model.patch_embed = embed


if SwinMaskTokenSwap.name not in family_names():
    register_family(SwinMaskTokenSwap)
