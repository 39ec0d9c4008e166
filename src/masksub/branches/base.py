"""What every family adapter provides, and the registry that picks one for a model.

A family turns a model into its sub-branch *in place* for the length of a context and puts it
back afterwards, also when the body raises. Adapters only touch the model's own slots (a
module attribute, a forward hook), so real timm / Hugging Face / open_clip models need no fork.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ..errors import MaskSubError, check_ratio

MODES = ("mask", "dropout", "droppath")
# The paper's strength per mode (Table 13): 50% masking, dropout 0.2, drop-path +0.1.
DEFAULT_RATIO = {"mask": 0.5, "dropout": 0.2, "droppath": 0.1}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model under DDP / FSDP / torch.compile wrappers, where the slots live."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"
        ):
            model = model.module
        else:
            break
    return model


class Family:
    """A way to make the sub-branch of one kind of model.

    Subclasses set ``name``, ``modes`` and ``default_ratio`` and implement ``matches`` and
    ``apply``. ``prepare`` adds what the branch needs to the model once (a mask token) so the
    optimizer sees it; ``validate`` checks an input before any work is done.
    """

    name: str = "family"
    modes: tuple[str, ...] = ("mask",)
    default_ratio: float = 0.5
    adds_parameters: bool = False  # True: prepare() adds a mask token (before the optimizer)

    def __init__(self, **options: Any) -> None:
        if options:
            raise MaskSubError(
                f"family {self.name!r} takes no option(s) {sorted(options)}; "
                f"see help(masksub.branches.{type(self).__name__})"
            )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return False

    def prepare(self, model: nn.Module) -> None:
        """Add parameters the sub-branch needs (before the optimizer is built)."""

    def validate(self, model: nn.Module, x: Any) -> None:
        """Raise MaskSubError on an input this branch cannot take."""

    def check(self, model: nn.Module, ratio: float) -> None:
        """Raise MaskSubError if ``ratio`` cannot work on this model (checked before any step)."""

    def apply(self, model: nn.Module, ratio: float) -> contextlib.AbstractContextManager:
        raise NotImplementedError


class PerModel:
    """Remembers what the walk over one model found, so a step does not walk every module.

    Keyed on the model object (weakly); a model whose structure changes needs a new MaskSub.
    """

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._value: Any = None

    def get(self, model: nn.Module, make: Any) -> Any:
        if self._ref is None or self._ref() is not model:
            self._value = make(model)
            self._ref = weakref.ref(model)
        return self._value


_REGISTRY: list[type[Family]] = []


def register_family(cls: type[Family]) -> type[Family]:
    """Register a family; later registrations are tried first, so users can override ours."""
    _REGISTRY.insert(0, cls)
    return cls


def family_names() -> list[str]:
    return [c.name for c in _REGISTRY]


def get_family(name: str) -> type[Family]:
    for cls in _REGISTRY:
        if cls.name == name:
            return cls
    raise MaskSubError(f"unknown family {name!r}; known: {', '.join(family_names())}")


def detect_family(model: nn.Module) -> type[Family]:
    """The first registered mask family whose ``matches`` accepts the model."""
    inner = unwrap(model)
    for cls in _REGISTRY:
        if "mask" in cls.modes and cls.matches(inner):
            return cls
    raise MaskSubError(
        f"no masking family fits {type(inner).__name__}. Known families: {', '.join(family_names())}. "
        "Pick one with family=NAME, or pass mask_fn=fn(model, x, ratio) -> masked x, or give the "
        "model a forward(x, mask_ratio=...) argument; mode='dropout' and mode='droppath' work for any model."
    )


def resolve_ratio(mode: str, ratio: float | None, family: type[Family] | None = None) -> float:
    if mode not in MODES:
        raise MaskSubError(f"mode must be one of {MODES}, got {mode!r}")
    if ratio is None:
        ratio = family.default_ratio if (family is not None and mode == "mask") else DEFAULT_RATIO[mode]
    what = {"mask": "mask ratio", "dropout": "dropout p_sub (ratio)", "droppath": "drop-path increase (ratio)"}[mode]
    return check_ratio(ratio, what)


@contextlib.contextmanager
def forward_pre_hook(model: nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """Install ``fn(module, args, kwargs) -> (args, kwargs)`` for the length of the context."""
    handle = model.register_forward_pre_hook(fn, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
