"""``MaskSub``: one training step with a main and a sub branch, in the user's own loop.

Order ``memory`` (default): forward+backward of the main branch first, so its activations are
freed before the sub forward; peak memory stays that of standard training. Under DDP that
first backward runs in ``no_sync()``: gradients are all-reduced once per step; under FSDP2
(``fully_shard``) it runs with ``set_requires_gradient_sync(False)``: reduce-scattered once. Order
``fused``: one backward on the summed loss (more memory, sometimes faster). Clipping, loss
scaling and the optimizer step stay with the caller, once, on the summed gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .branches import Family, build_branch, resolve_ratio, unwrap
from .errors import MaskSubError
from .loss import KINDS, relaxed_loss

ORDERS = ("memory", "fused")


@dataclass
class StepOutput:
    """What one step produced. Losses are detached 0-d tensors *before* the 1/2 weights,
    so logging them costs no host sync until the caller asks for ``float()``."""

    main_logits: Tensor
    loss_main: Tensor
    loss_sub: Tensor | None = None
    sub_logits: Tensor | None = None
    loss: Tensor | None = None
    grad_norm_main: Tensor | None = None
    grad_norm_sub: Tensor | None = None


def default_forward(model: nn.Module, x: Any) -> Tensor:
    """Call the model the way its input says (dict -> keywords) and find the logits."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return logits_of(out)


def logits_of(out: Any) -> Tensor:
    """The logits of a model output: a tensor, an object or dict with ``logits`` (Hugging Face
    ``ModelOutput``), or a tuple whose first item is the logits. The one helper every
    integration uses."""
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise MaskSubError(
        f"cannot find logits in the model output ({type(out).__name__}); pass forward_fn=fn(model, x) -> logits"
    )


def model_autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on the model's device; nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)


def ddp_no_sync(model: nn.Module, skip: bool = True) -> contextlib.AbstractContextManager:
    """No gradient communication in the backward inside, when ``skip``: DDP's ``no_sync()``, or
    FSDP2's ``set_requires_gradient_sync(False)`` (restored on exit); nothing for a model that
    has neither. Under FSDP2 the unsharded gradients then wait, accumulated, for the next
    backward's reduce-scatter (the price of one reduce-scatter per step instead of two)."""
    if skip and hasattr(model, "no_sync") and hasattr(model, "require_backward_grad_sync"):
        return model.no_sync()
    if skip and hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    # What it was before (a caller's own accumulation may have turned it off); FSDP2 keeps it
    # on each param group as ``reduce_grads``. Unreadable: assume on, FSDP2's default.
    groups = getattr(getattr(model, "_get_fsdp_state", lambda: None)(), "_fsdp_param_groups", None) or []
    was = all(getattr(g, "reduce_grads", True) for g in groups)
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(was)


def _grads(params: list[nn.Parameter]) -> list[Tensor | None]:
    """Copies of the current gradients (None stays None: nothing to copy after zero_grad)."""
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _norm_of_diff(params: list[nn.Parameter], before: list[Tensor | None], scale: float) -> Tensor:
    """The norm of what was added to ``.grad`` since ``before``, as ``clip_grad_norm_`` takes it."""
    added = [p.grad.detach() if b is None else p.grad.detach() - b
             for p, b in zip(params, before, strict=True) if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(added)
    if hasattr(norm, "full_tensor"):  # FSDP2: sharded gradients, the norm of the whole
        norm = norm.full_tensor()
    return norm / scale


# amp_dtype: the common spellings, so a config string works the same as a torch dtype
_AMP_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
              "float16": torch.float16, "half": torch.float16, "none": None, "fp32": None, "float32": None}


def resolve_amp_dtype(value: Any) -> torch.dtype | None:
    """A torch dtype, one of the common strings, or None; anything else fails at construction,
    not at the first step."""
    if value is None or value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in _AMP_NAMES:
        return _AMP_NAMES[value.lower()]
    raise MaskSubError(f"amp_dtype must be torch.bfloat16, torch.float16, None or one of "
                       f"{', '.join(_AMP_NAMES)}, got {value!r}")


def check_loss_scale(loss_scale: Any) -> float:
    """A finite number > 0 (e.g. 1 / accumulation steps): a negative or NaN one would train backwards
    or poison every gradient."""
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not 0 < loss_scale < math.inf:
        raise MaskSubError(f"loss_scale must be a finite number > 0 (e.g. 1 / accumulation steps), got {loss_scale!r}")
    return float(loss_scale)


@contextlib.contextmanager
def _restore_grads_on_error(params: list[nn.Parameter]) -> Iterator[None]:
    """An error after the main backward (order "memory") leaves ``.grad`` as it was: gradients
    that were empty are emptied again (no copy is kept, so no memory is spent); where gradients
    were already accumulated, the error says that the main branch's part was added to them."""
    empty = [p.grad is None for p in params]
    try:
        yield
    except Exception as e:
        for p, was_empty in zip(params, empty, strict=True):
            if was_empty:
                p.grad = None
        if not all(empty) and isinstance(e, MaskSubError):
            raise MaskSubError(f"{e} (the main branch's gradient of this step was already added to the "
                               "gradients accumulated before it: zero_grad() before retrying)") from None
        raise


class MaskSub:
    """Add a masked sub-branch to any supervised step.

    >>> ms = MaskSub(model, mode="mask", ratio=0.5)      # before the optimizer
    >>> out = ms.backward(x, y, criterion)                 # grads of (loss1 + loss2) / 2 summed
    >>> optimizer.step()

    ``ratio=None`` takes the paper's value (mask 0.5, text 0.15, dropout 0.2, drop-path +0.1).
    ``mode=None`` (or ``"none"``) turns the sub-branch off: a plain step, for baselines.
    ``amp_dtype`` runs both forwards under autocast (backward outside it).

    ``sync_main = True`` (FSDP2): the main backward reduce-scatters too, two per step, so FSDP
    holds no unsharded gradient until the sub backward (for models where one full gradient
    per GPU does not fit). The default is one reduce-scatter per step, as under DDP.
    """

    sync_main: bool = False

    def __init__(self, model: nn.Module, mode: str | None = "mask", ratio: float | None = None, *,
                 family: str | None = None, order: str = "memory", kind: str = "softmax",
                 main_weight: float = 0.5, sub_weight: float = 0.5,
                 forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 amp_dtype: torch.dtype | None = None, **family_options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise MaskSubError(f"MaskSub takes an nn.Module, got {type(model).__name__}")
        if order not in ORDERS:
            raise MaskSubError(f"order must be one of {ORDERS}, got {order!r}")
        if kind not in KINDS:
            raise MaskSubError(f"kind must be one of {KINDS}, got {kind!r} (sigmoid for BCE recipes)")
        for name, w in (("main_weight", main_weight), ("sub_weight", sub_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                raise MaskSubError(f"{name} must be a non-negative number, got {w!r}")
        self.model = model
        self.mode = None if mode in (None, "none") else mode
        self.order = order
        self.kind = kind
        self.main_weight = float(main_weight)
        self.sub_weight = float(sub_weight)
        self.forward_fn = forward_fn or default_forward
        self.amp_dtype = resolve_amp_dtype(amp_dtype)
        self.branch: Family | None = None
        self.ratio = 0.0
        if self.mode is not None:
            self.branch = build_branch(model, self.mode, family, **family_options)
            self.ratio = resolve_ratio(self.mode, ratio, type(self.branch))
            self._prepare(model)
            self.branch.check(unwrap(model), self.ratio)
        elif family_options or ratio:
            raise MaskSubError("mode is off ('none'): ratio and family options have no effect; set mode='mask'")

    def _prepare(self, model: nn.Module) -> None:
        """Add the branch's parameters; refuse when a DDP/FSDP wrapper could no longer see them."""
        inner = unwrap(model)
        before = {id(p) for p in inner.parameters()}
        self.branch.prepare(inner)
        added = [n for n, p in inner.named_parameters() if id(p) not in before]
        sharded = [n for n, m in inner.named_modules() if hasattr(m, "set_requires_gradient_sync")]
        if added and sharded:  # FSDP2 shards in place: a parameter added now is in no group
            for name in added:
                if "." not in name:
                    delattr(inner, name)
            raise MaskSubError(
                f"the {self.branch.name!r} sub-branch adds the parameter(s) {added}, but the model is "
                "already sharded with fully_shard, which would never shard or reduce them; build "
                "MaskSub (or call masksub.prepare(model, ...)) on the bare model before fully_shard"
            )
        if added and inner is not model and type(model).__name__ != "OptimizedModule":
            for name in added:
                if "." not in name:
                    delattr(inner, name)
            raise MaskSubError(
                f"the {self.branch.name!r} sub-branch adds the parameter(s) {added}, which "
                f"{type(model).__name__} (built before) would never synchronise; call "
                "masksub.prepare(model, ...) or build MaskSub on the bare model before wrapping it"
            )

    # -- pieces a custom loop can use on its own -------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return model_autocast(self.model, self.amp_dtype)

    @contextlib.contextmanager
    def sub(self) -> Iterator[nn.Module]:
        """Inside, ``self.model(x)`` is the sub-branch."""
        if self.branch is None:
            raise MaskSubError("the sub-branch is off (mode='none')")
        with self.branch.apply(unwrap(self.model), self.ratio):
            yield self.model

    def forward_main(self, x: Any) -> Tensor:
        with self._autocast():
            return self.forward_fn(self.model, x)

    def forward_sub(self, x: Any) -> Tensor:
        with self._autocast(), self.sub():
            return self.forward_fn(self.model, x)

    def validate(self, x: Any) -> None:
        if self.branch is not None:
            self.branch.validate(unwrap(self.model), x)

    # -- the step ---------------------------------------------------------------------------
    def backward(self, x: Any, y: Any, criterion: Callable[[Tensor, Any], Tensor], *,
                 scaler: torch.amp.GradScaler | None = None, grad_norms: bool = False,
                 sync: bool = True, loss_scale: float = 1.0) -> StepOutput:
        """Main and sub forward + backward; the gradients of both losses end summed in ``.grad``.

        ``sync=False`` keeps DDP from all-reducing (gradient accumulation, not the last
        micro-batch); ``loss_scale`` multiplies both losses (e.g. 1 / accumulation steps).
        """
        loss_scale = check_loss_scale(loss_scale)
        self.validate(x)  # shape checks only, every step: a bad batch fails before any work
        model = self.model
        scale = float(scaler.get_scale()) if (grad_norms and scaler is not None and scaler.is_enabled()) else 1.0
        params = [p for p in model.parameters() if p.requires_grad] if grad_norms else []

        def _bw(loss: Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        def _main_loss(logits: Tensor) -> Tensor:
            loss = criterion(logits, y)
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise MaskSubError(
                    f"the criterion must return a scalar loss, got {shape}; use reduction='mean'"
                )
            return loss

        if self.branch is None:  # plain step
            with ddp_no_sync(model, not sync):
                main = self.forward_main(x)
                loss_main = _main_loss(main)
                before = _grads(params) if grad_norms else None
                _bw(loss_main * loss_scale)
            out = StepOutput(main.detach(), loss_main.detach(), loss=loss_main.detach())
            if grad_norms:
                out.grad_norm_main = _norm_of_diff(params, before, scale)
            return out

        wm, ws = self.main_weight * loss_scale, self.sub_weight * loss_scale
        if self.order == "memory":
            # FSDP2 keeps an unsynced gradient inside, out of ``.grad``: a step that measures the
            # main branch's gradient norm syncs it (one extra reduce-scatter, on those steps only)
            fsdp = hasattr(model, "set_requires_gradient_sync")
            with _restore_grads_on_error([p for p in model.parameters() if p.requires_grad]):
                with ddp_no_sync(model, not (fsdp and (grad_norms or self.sync_main))):
                    main = self.forward_main(x)
                    loss_main = _main_loss(main)
                    before = _grads(params) if grad_norms else None
                    _bw(loss_main * wm)
                main = main.detach()
                if grad_norms:  # the main part now, before the sub backward adds to .grad
                    norm_main = _norm_of_diff(params, before, scale)
                    mid = _grads(params)
                with ddp_no_sync(model, not sync):
                    sub = self.forward_sub(x)
                    loss_sub = relaxed_loss(sub, main, self.kind)
                    _bw(loss_sub * ws)
            out = StepOutput(main, loss_main.detach(), loss_sub.detach(), sub.detach())
            if grad_norms:
                out.grad_norm_main = norm_main
                out.grad_norm_sub = _norm_of_diff(params, mid, scale)
        else:
            if grad_norms:
                raise MaskSubError("grad_norms=True needs order='memory' (the fused order has one backward)")
            with ddp_no_sync(model, not sync):
                main = self.forward_main(x)
                loss_main = _main_loss(main)
                sub = self.forward_sub(x)
                loss_sub = relaxed_loss(sub, main, self.kind)
                _bw(loss_main * wm + loss_sub * ws)
            out = StepOutput(main.detach(), loss_main.detach(), loss_sub.detach(), sub.detach())
        out.loss = out.loss_main * self.main_weight + out.loss_sub * self.sub_weight
        return out
