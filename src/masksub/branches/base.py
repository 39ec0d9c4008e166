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


def class_name(model: nn.Module) -> str:
    """The model's own class name, also after FSDP2's ``fully_shard`` (which swaps the class
    for a generated ``FSDP<Name>`` subclass in place)."""
    cls = type(model)
    index = getattr(cls, "_orig_cls_mro_index", None)
    if isinstance(index, int) and len(cls.__mro__) > index:
        cls = cls.__mro__[index]
    return cls.__name__


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
    # What is known of the family, in one place (``masksub inspect`` and the tests read it):
    priority: int = 1000  # detection order, highest first; the built-in families sit below 1000
    why: str = ""  # why the family fits a model its ``matches`` accepts
    cost: float = 1.0  # sub forward+backward / main forward+backward that the family promises
    masks_ratio: bool = True  # the ratio is the fraction of the input masked (not a rate)
    masks_in_training_only: bool = False  # True: the model reads its own masking slot only in train()

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

    def expected_cost(self, model: nn.Module) -> float:
        """The cost this family promises on ``model`` (a hybrid ViT's conv stem runs in full)."""
        return self.cost

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        """What the sub-branch does to the input ``x``, in words and counts (no forward run)."""
        return f"{self.name} sub-branch at ratio {ratio:g}"


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


_REGISTRY: dict[str, type[Family]] = {}  # name -> family, in registration order


def register_family(cls: type[Family]) -> type[Family]:
    """Register a family (usable as a class decorator where the family is defined).

    Detection tries the highest ``priority`` first, and among equals the latest registered, so a
    user's family (priority 1000 unless set) is tried before the built-in ones. A name already
    taken by another class is refused: it would shadow that family silently.
    """
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise MaskSubError(f"register_family takes a Family subclass, got {cls!r}")
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls:
        raise MaskSubError(
            f"a family named {cls.name!r} is already registered ({old.__module__}.{old.__qualname__}); "
            "give yours another name")
    _REGISTRY[cls.name] = cls
    return cls


def _ordered() -> list[type[Family]]:
    order = list(_REGISTRY.values())
    return sorted(order, key=lambda c: (-c.priority, -order.index(c)))


def family_names() -> list[str]:
    """Every registered family, in detection order (mode families, DropSub / PathSub, last)."""
    return [c.name for c in _ordered()]


def get_family(name: str) -> type[Family]:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise MaskSubError(f"unknown family {name!r}; known: {', '.join(family_names())}")
    return cls


def detect_family(model: nn.Module) -> type[Family]:
    """The first registered mask family whose ``matches`` accepts the model."""
    inner = unwrap(model)
    for cls in _ordered():
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
