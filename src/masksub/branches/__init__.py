"""Sub-branches per model family, and ``sub_branch``: the context that makes ``model(x)`` one.

Each family registers itself where it is defined (``@register_family``), with what is known of
it: detection priority, why it fits, the cost it promises, how it describes what it does. A new
family is one module in this package; ``family=`` overrides detection.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..errors import MaskSubError
from .base import (
    MODES,
    Family,
    detect_family,
    family_names,
    get_family,
    register_family,
    resolve_ratio,
    unwrap,
)
from .drop import DropSub, PathSub

# Every module of this package is imported, and each family registers itself where it is
# defined: a new family is one file here.
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "MODES", "Family", "DropSub", "PathSub", "build_branch", "detect_family", "family_names",
    "get_family", "register_family", "sub_branch", "prepare",
]


# Families that work for any model: chosen by mode, so a mask family named beside them is moot.
_ANY_MODEL: dict[str, type[Family]] = {"dropout": DropSub, "droppath": PathSub}


def build_branch(model: nn.Module, mode: str = "mask", family: str | None = None, **options: Any) -> Family:
    """The family adapter for ``model`` and ``mode``; explicit ``family=`` overrides detection."""
    if mode not in MODES:
        raise MaskSubError(f"mode must be one of {MODES}, got {mode!r}")
    inner = unwrap(model)
    named = None if family is None else _ANY_MODEL.get(family) or get_family(family)  # typos fail
    if mode in _ANY_MODEL:
        cls: type[Family] = _ANY_MODEL[mode]
        options = _own_options(cls, mode, options)
    elif "mask_fn" in options:
        cls = get_family("custom")
    elif named is not None:
        cls = named
    else:
        cls = detect_family(inner)
    if mode not in cls.modes:
        raise MaskSubError(f"family {cls.name!r} does not support mode {mode!r}; it supports {cls.modes}")
    return cls(**options)


def _own_options(cls: type[Family], mode: str, options: dict[str, Any]) -> dict[str, Any]:
    """A mask family's options left in a config after switching to DropSub / PathSub (e.g.
    ``tokenizer=``) do not apply: dropped with a warning, not refused."""
    own = set(inspect.signature(cls.__init__).parameters) - {"self", "options"}
    extra = sorted(k for k in options if k not in own)
    if extra:
        warnings.warn(f"mode={mode!r} ignores the masking option(s) {extra}", stacklevel=3)
    return {k: v for k, v in options.items() if k in own}


def prepare(model: nn.Module, mode: str = "mask", family: str | None = None, **options: Any) -> Family:
    """Add what the sub-branch needs to ``model`` (a mask token) before the optimizer is built."""
    branch = build_branch(model, mode, family, **options)
    inner = unwrap(model)
    before = {id(p) for p in inner.parameters()}
    branch.prepare(inner)
    added = [n for n, p in inner.named_parameters() if id(p) not in before]
    if added and any(hasattr(m, "set_requires_gradient_sync") for m in inner.modules()):  # FSDP2
        for name in added:
            if "." not in name:
                delattr(inner, name)
        raise MaskSubError(f"masksub.prepare adds {added} to a model already sharded with fully_shard, "
                           "which would neither shard nor reduce them; call it before fully_shard")
    return branch


@contextlib.contextmanager
def sub_branch(model: nn.Module, mode: str = "mask", ratio: float | None = None,
               family: str | Family | None = None, **family_options: Any) -> Iterator[nn.Module]:
    """Inside the context ``model(x)`` is the sub-branch; the model is restored on exit.

    ``ratio`` is the one strength knob: mask ratio (``mask``), p_sub (``dropout``), drop-path
    increase (``droppath``); ``None`` takes the paper's value for the family.
    """
    branch = family if isinstance(family, Family) else build_branch(model, mode, family, **family_options)
    if mode not in branch.modes:
        raise MaskSubError(f"family {branch.name!r} does not support mode {mode!r}; it supports {branch.modes}")
    r = resolve_ratio(mode, ratio, type(branch))
    inner = unwrap(model)
    if not getattr(branch, "adds_parameters", False):  # those warn if they must add a token here
        branch.prepare(inner)
    branch.check(inner, r)
    with branch.apply(inner, r):
        yield model
