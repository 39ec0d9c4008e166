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
from .base import Family, PerModel, register_family

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


def _is_residual_dropout(parent_name: str, parent: nn.Module, leaf: str) -> bool:
    """A dropout on the output of a residual branch: the attention projection (timm
    ``attn.proj_drop``; Hugging Face ``*SelfOutput.dropout``) or the MLP (timm ``mlp.drop`` /
    ``drop1`` / ``drop2``; Hugging Face ``*Output.dropout``, ``ffn.dropout``)."""
    owner = parent_name.rsplit(".", 1)[-1].lower()
    cls = type(parent).__name__
    parts = parent_name.lower().split(".")
    if any(p.startswith("head") or p == "pre_logits" for p in parts) or cls.endswith("Head"):
        return False  # a classifier head's (timm NormMlpClassifierHead, VGG's pre_logits ConvMlp)
    if leaf in ("proj_drop", "resid_dropout", "output_dropout", "out_drop"):
        # timm attn.proj_drop; GPT-2 attn.resid_dropout; ALBERT attention.output_dropout; ModernBERT attn.out_drop
        return "attn" in owner or "attention" in owner or "Attention" in cls
    if leaf in ("drop", "drop1", "drop2", "dropout"):
        if "mlp" in owner or "ffn" in owner or "Mlp" in cls or "FFN" in cls or "FeedForward" in cls:
            return True
    if leaf == "dropout" and "Embedding" not in cls:
        # HF BERT: *SelfOutput / *Output.dropout; HF ViT (v5): *Layer.dropout on both branches
        return cls.endswith("Output") or (cls.endswith("Layer") and hasattr(parent, "attention"))
    return False


def _is_conv_placeholder(parent: nn.Module, m: nn.Module) -> bool:
    """A ``Dropout(0)`` beside a conv in a conv-norm-act unit (timm EfficientViT's after every
    conv): not a regulariser the model was designed with."""
    return getattr(m, "p", None) == 0 and any(isinstance(c, nn.modules.conv._ConvNd) for c in parent.children())


def _residual_dropout_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The authors' DropSub scope (naver-ai/augsub ``deit/models_v2.py``,
    ``forward_features_dropout``: every block's ``attn.proj_drop.p`` and ``mlp.drop.p``): the
    residual-branch dropouts. Position, attention-probability, head and ``Dropout(0)``
    placeholder dropouts after convs are left alone."""
    parents = dict(model.named_modules())
    slots = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.dropout._DropoutNd) or "." not in name:
            continue
        parent_name, leaf = name.rsplit(".", 1)
        if any("pos" in part for part in parent_name.split(".")):  # a position-bias MLP (timm rel_pos.mlp)
            continue
        if _is_residual_dropout(parent_name, parents[parent_name], leaf):
            slots.append((m, "p"))
    return slots


SCOPES = ("residual", "all")


def dropout_slots(model: nn.Module, scope: str = "residual") -> tuple[list[tuple[nn.Module, str]], str]:
    """The (module, attribute) rates DropSub raises, and the scope actually used: ``residual``
    (the authors'), or ``all`` when asked for or when the model has no residual-branch dropout
    (a CNN whose only dropout is its head's)."""
    if scope == "residual":
        slots = _residual_dropout_slots(model)
        if slots:
            return slots, "residual"
        parents = dict(model.named_modules())
        placeholders = {id(m) for n, m in model.named_modules() if "." in n
                        and isinstance(m, nn.modules.dropout._DropoutNd)
                        and _is_conv_placeholder(parents[n.rsplit(".", 1)[0]], m)}
        slots = [(m, a) for m, a in _dropout_slots(model) if id(m) not in placeholders]
        if slots:
            return slots, "no residual-branch dropout: every other dropout"
    return _dropout_slots(model), "all"


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
def set_rates(changes: Iterable[tuple[nn.Module, str, float]]) -> Iterator[None]:
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


@register_family
class DropSub(Family):
    """The residual-branch dropouts (attention projection, MLP) at ``p_sub`` (the ratio; paper
    0.2) for the sub forward, as the authors' code does. ``scope="all"``: every dropout rate in
    the model (position, attention, head, placeholders after convs too). A model without a
    residual-branch dropout (a CNN with a head dropout) gets every dropout it has."""

    name = "dropout"
    modes = ("dropout",)
    default_ratio = 0.2
    priority = 0  # chosen by mode, never detected
    why = "DropSub works for any model with dropout layers"
    masks_ratio = False

    def __init__(self, scope: str = "residual", **options: Any) -> None:
        super().__init__(**options)
        if scope not in SCOPES:
            raise MaskSubError(f"DropSub scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self._slots = PerModel()
        self._seen = PerModel()  # {"ran": bool}: a raised dropout ran in a sub forward of this model

    def slots(self, model: nn.Module) -> tuple[list[tuple[nn.Module, str]], str]:
        """What the sub forward raises on ``model``, and the scope used (for ``masksub inspect``)."""
        return self._slots.get(model, lambda m: dropout_slots(m, self.scope))

    def prepare(self, model: nn.Module) -> None:
        if not self.slots(model)[0]:
            raise MaskSubError(
                f"{type(model).__name__} has no dropout module for DropSub to raise; build it with its dropout "
                "layers where its builder has them (timm: drop_rate / proj_drop_rate; HF: hidden_dropout_prob), "
                "or use mode='mask'"
            )

    def validate(self, model: nn.Module, x: Any) -> None:
        _require_train(model, "dropout")

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        slots, scope = self.slots(model)
        return f"{len(slots)} dropout rate(s) set to {ratio:g} ({scope})"

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        _require_train(model, "dropout")
        slots = self.slots(model)[0]
        seen = self._seen.get(model, lambda m: {"ran": False})
        with set_rates((m, a, ratio) for m, a in slots), \
                _must_run(model, [m for m, _ in slots], seen, f"DropSub raised {len(slots)} dropout rate(s)"):
            yield


@contextlib.contextmanager
def _counting(module: nn.Module, calls: list[int], i: int) -> Iterator[None]:
    """Count ``module``'s forward calls in ``calls[i]`` for the length of the context."""
    def hook(*_: Any) -> None:
        calls[i] += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _must_run(model: nn.Module, raised: list[nn.Module], seen: dict[str, bool], what: str) -> Iterator[None]:
    """Until one sub forward showed a raised module running, count calls: a model that ran while
    none of ``raised`` did would give a sub-branch equal to the main one, so it is refused."""
    if seen["ran"]:
        yield
        return
    calls = [0, 0]  # model forwards, raised-module forwards
    with contextlib.ExitStack() as hooks:
        hooks.enter_context(_counting(model, calls, 0))
        for m in {id(m): m for m in raised}.values():
            hooks.enter_context(_counting(m, calls, 1))
        yield
    if calls[1]:
        seen["ran"] = True
    elif calls[0]:
        raise MaskSubError(
            f"{what} of {type(model).__name__}, but none of them ran in its forward: the sub-branch "
            "would equal the main branch; use another mode (mode='mask', 'dropout' or 'droppath')")


def drop_path_slots(model: nn.Module) -> tuple[list[tuple[nn.Module, str]], list[tuple[nn.Module, str]]]:
    """(module, rate attribute) of every drop-path, and the empty ``drop_path*`` slots
    (``nn.Identity`` or ``None``) timm leaves where the schedule gave rate 0."""
    paths = [(m, a) for m in model.modules() if (a := _drop_path_attr(m)) is not None]
    empty = []
    for m in model.modules():
        for name, child in list(m._modules.items()) + [(k, v) for k, v in m.__dict__.items() if v is None]:
            if _DROP_PATH_SLOT.match(name) and (child is None or type(child) is nn.Identity):
                empty.append((m, name))
    return paths, empty


@register_family
class PathSub(Family):
    """Every drop-path at its own rate plus ``delta`` (the ratio; paper +0.1).

    Blocks whose schedule gave rate 0 hold ``nn.Identity`` or ``None`` in their ``drop_path``
    slots (timm); those get a ``DropPath(delta)`` for the sub forward so *every* block is raised.
    """

    name = "droppath"
    modes = ("droppath",)
    default_ratio = 0.1
    priority = 0  # chosen by mode, never detected
    why = "PathSub works for any model with drop-path (stochastic depth)"
    masks_ratio = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._slots = PerModel()
        self._seen = PerModel()  # {"ran": bool}: a drop-path ran in a sub forward of this model
        self._fill = DropPath(0.0)

    def prepare(self, model: nn.Module) -> None:
        paths, empty = self._slots.get(model, drop_path_slots)
        if not paths and not empty:
            raise MaskSubError(
                f"{type(model).__name__} has no drop-path (stochastic depth) for PathSub to raise. PathSub "
                "needs one: a timm model whose builder takes drop_path_rate, built with drop_path_rate > 0 "
                "(VGG, DenseNet, DPN, GhostNet, SHViT have none); otherwise use mode='mask' or mode='dropout'"
            )

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        paths, empty = self._slots.get(model, drop_path_slots)
        return f"{len(paths)} drop-path rate(s) +{ratio:g}, {len(empty)} empty slot(s) get drop-path {ratio:g}"

    def check(self, model: nn.Module, ratio: float) -> None:
        paths, _ = self._slots.get(model, drop_path_slots)
        bad = [getattr(m, a) for m, a in paths if getattr(m, a) + ratio >= 1.0]
        if bad:
            raise MaskSubError(f"drop-path {max(bad):.4g} + delta {ratio:.4g} reaches 1; use a smaller delta (ratio)")

    def validate(self, model: nn.Module, x: Any) -> None:
        _require_train(model, "drop-path")

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        _require_train(model, "drop-path")
        paths, empty = self._slots.get(model, drop_path_slots)
        self.check(model, ratio)
        fill = self._fill  # stateless: one serves every slot, and every step
        fill.drop_prob = ratio
        fill.train(model.training)
        swapped: list[tuple[nn.Module, str, Any, bool]] = []
        seen = self._seen.get(model, lambda m: {"ran": False})
        what = f"PathSub raised {len(paths)} drop-path rate(s) and filled {len(empty)} empty slot(s)"
        with set_rates((m, a, getattr(m, a) + ratio) for m, a in paths):
            try:
                for m, name in empty:
                    in_modules = name in m._modules
                    old = m._modules[name] if in_modules else m.__dict__.pop(name)
                    swapped.append((m, name, old, in_modules))
                    m._modules[name] = fill
                with _must_run(model, [m for m, _ in paths] + [fill], seen, what):
                    yield
            finally:
                for m, name, old, in_modules in reversed(swapped):
                    if in_modules:
                        m._modules[name] = old
                    else:
                        del m._modules[name]
                        m.__dict__[name] = old
