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


ORDERS = ("memory", "fused")

#: AMP names: the common spellings of an autocast dtype, so a config string, a CLI choice and a
#: torch dtype mean the same everywhere ("none", "fp32": no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "none": None, "fp32": None, "float32": None}


def resolve_amp_dtype(value: Any) -> torch.dtype | None:
    """A torch dtype, one of the common strings, or None; anything else fails at construction,
    not at the first step."""
    if value is None or value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in AMP_DTYPES:
        return AMP_DTYPES[value.lower()]
    raise MaskSubError(f"amp_dtype must be torch.bfloat16, torch.float16, None or one of "
                       f"{', '.join(AMP_DTYPES)}, got {value!r}")


def check_order(order: Any) -> str:
    if order not in ORDERS:
        raise MaskSubError(f"order must be one of {ORDERS}, got {order!r}")
    return order


def check_loss_scale(loss_scale: Any) -> float:
    """A finite number > 0 (e.g. 1 / accumulation steps): a negative or NaN one would train backwards
    or poison every gradient."""
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not 0 < loss_scale < math.inf:
        raise MaskSubError(f"loss_scale must be a finite number > 0 (e.g. 1 / accumulation steps), got {loss_scale!r}")
    return float(loss_scale)


def check_weights(main_weight: Any, sub_weight: Any) -> tuple[float, float]:
    for name, w in (("main_weight", main_weight), ("sub_weight", sub_weight)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
            raise MaskSubError(f"{name} must be a non-negative number, got {w!r}")
    return float(main_weight), float(sub_weight)


def plain_backward(scaler: torch.amp.GradScaler | None = None) -> Callable[[Tensor], None]:
    """``loss.backward()``, through the GradScaler when one is given."""
    if scaler is None:
        return lambda loss: loss.backward()
    return lambda loss: scaler.scale(loss).backward()


@dataclass
class BranchLosses:
    """What :func:`two_branch_step` produced. ``loss_main`` / ``loss_sub`` are detached and before
    the weights; ``pending`` is the weighted loss whose backward the caller still has to run
    (``backward=None`` or ``run_last=False``), else None."""

    loss_main: Tensor
    loss_sub: Tensor | None
    target: Any
    pending: Tensor | None = None


def two_branch_step(main: Callable[[], tuple[Tensor, Any]],
                    sub: Callable[[Any], Tensor | tuple[Tensor, Tensor]] | None, *,
                    order: str = "memory", weights: tuple[float, float] = (0.5, 0.5),
                    loss_scale: float = 1.0, backward: Callable[[Tensor], None] | None = None,
                    run_last: bool = True,
                    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                    sync: bool = True, sync_main: bool = False,
                    after_main: Callable[[], None] | None = None) -> BranchLosses:
    """The MaskSub step every loop shares (``MaskSub``, the CLIP step, the Trainer, Lightning).

    ``main()`` runs the main forward and returns ``(loss_main, target)``, the target detached;
    ``sub(target)`` runs the sub forward and returns ``loss_sub`` (or ``(loss_sub, extra)``,
    ``extra`` added unweighted to the sub backward's loss). ``sub=None``: a plain step.
    ``backward(loss)``: ``loss.backward()``, a GradScaler's, ``accelerator.backward``,
    Lightning's ``manual_backward``; None (fused order only) returns the weighted loss in
    ``pending`` for a framework that runs the backward itself, as does ``run_last=False``
    (the memory order then runs the main backward and leaves the sub one).
    ``no_sync()``: a context without gradient communication (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync(False)``). The main forward runs in it (DDP arms its all-reduce at
    forward time), and in order ``memory`` so does the main backward unless ``sync_main``: one
    all-reduce per step. ``sync=False`` keeps everything in it (accumulation, not the last
    micro-batch). ``after_main()`` runs between the two backward passes (order memory).
    """
    check_order(order)
    loss_scale = check_loss_scale(loss_scale)
    if backward is None:
        run_last = False
        if order == "memory" and sub is not None:
            raise MaskSubError("order='memory' runs the main backward before the sub forward: pass "
                               "backward=..., or use order='fused' to get the summed loss back")
    quiet = no_sync or contextlib.nullcontext
    last_ctx = quiet if not sync else contextlib.nullcontext

    if sub is None:  # plain step
        with last_ctx():
            loss_main, target = main()
            pending = loss_main * loss_scale
            if run_last:
                backward(pending)
        return BranchLosses(loss_main.detach(), None, target, None if run_last else pending)

    wm, ws = weights[0] * loss_scale, weights[1] * loss_scale
    if order == "memory":
        with (contextlib.nullcontext() if sync_main else quiet()):
            loss_main, target = main()
            backward(loss_main * wm)
        if after_main is not None:
            after_main()
        with last_ctx():
            loss_sub, extra = _split(sub(target))
            pending = loss_sub * ws + extra if extra is not None else loss_sub * ws
            if run_last:
                backward(pending)
        pending = None if run_last else pending
    else:
        with quiet():
            loss_main, target = main()
        with last_ctx():
            loss_sub, extra = _split(sub(target))
            pending = loss_main * wm + loss_sub * ws
            if extra is not None:
                pending = pending + extra
            if run_last:
                backward(pending)
                pending = None
    return BranchLosses(loss_main.detach(), loss_sub.detach(), target, pending)


def _split(res: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    return (res[0], res[1]) if isinstance(res, tuple) else (res, None)


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


# families whose sub-branch takes whatever input the model takes (no image masking)
_ANY_INPUT_FAMILIES = ("text", "dropout", "droppath", "custom")


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
        check_order(order)
        if kind not in KINDS:
            raise MaskSubError(f"kind must be one of {KINDS}, got {kind!r} (sigmoid for BCE recipes)")
        self.main_weight, self.sub_weight = check_weights(main_weight, sub_weight)
        self.model = model
        self.mode = None if mode in (None, "none") else mode
        self.order = order
        self.kind = kind
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
        """Checks on the batch and the model before any forward: a clear error, not a raw one
        from deep inside (or a NaN loss returned silently)."""
        if not any(p.requires_grad for p in self.model.parameters()):
            raise MaskSubError(f"every parameter of {type(unwrap(self.model)).__name__} is frozen "
                               "(requires_grad=False): there is nothing to train; unfreeze the layers to train "
                               "(e.g. the head) before the step")
        if isinstance(x, (list, tuple)) and self.forward_fn is default_forward:
            raise MaskSubError(f"x is a {type(x).__name__} of {len(x)} items; MaskSub takes one batch: a tensor "
                               "(torch.stack the samples) or a dict of tensors, or pass forward_fn=fn(model, x)")
        first = x if isinstance(x, Tensor) else next(
            (v for v in x.values() if isinstance(v, Tensor)), None) if isinstance(x, Mapping) else None
        if first is not None and first.ndim > 0 and first.shape[0] == 0:
            raise MaskSubError(f"the batch is empty (shape {tuple(first.shape)}): its mean loss would be NaN; "
                               "skip empty batches (e.g. DataLoader(drop_last=True))")
        if (isinstance(x, Tensor) and x.ndim != 4 and self.branch is not None
                and self.branch.name not in _ANY_INPUT_FAMILIES):
            raise MaskSubError(f"the {self.branch.name!r} sub-branch masks image batches (N, C, H, W), got shape "
                               f"{tuple(x.shape)}" + ("; a single image? use x.unsqueeze(0)" if x.ndim == 3 else ""))
        if self.branch is not None:
            self.branch.validate(unwrap(self.model), x)

    # -- the step ---------------------------------------------------------------------------
    def backward(self, x: Any, y: Any, criterion: Callable[[Tensor, Any], Tensor], *,
                 scaler: torch.amp.GradScaler | None = None, grad_norms: bool = False,
                 sync: bool = True, loss_scale: float = 1.0,
                 backward_fn: Callable[[Tensor], None] | None = None,
                 no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> StepOutput:
        """Main and sub forward + backward; the gradients of both losses end summed in ``.grad``.

        ``sync=False`` keeps DDP from all-reducing (gradient accumulation, not the last
        micro-batch); ``loss_scale`` multiplies both losses (e.g. 1 / accumulation steps).
        ``backward_fn`` runs each backward instead of ``loss.backward()`` (e.g.
        ``accelerator.backward``: called twice in order memory, once in order fused).
        ``no_sync``: the context without gradient communication, for a wrapper this object does
        not hold (default: the model's own DDP ``no_sync`` / FSDP2 switch; Lightning:
        ``trainer.strategy.block_backward_sync``). ``grad_norms=True`` measures each branch's gradient norm; under DDP on the gradients
        averaged over processes (one more all-reduce on those steps).
        """
        loss_scale = check_loss_scale(loss_scale)
        if backward_fn is not None and scaler is not None:
            raise MaskSubError("pass scaler or backward_fn, not both (backward_fn scales the loss itself)")
        self.validate(x)  # shape checks only, every step: a bad batch fails before any work
        model = self.model
        if grad_norms and self.branch is not None and self.order != "memory":
            raise MaskSubError("grad_norms=True needs order='memory' (the fused order has one backward)")
        if self.order == "memory" and self.branch is not None and backward_fn is not None:
            # accelerate's backward under DeepSpeed / Megatron-LM also runs the engine's optimizer
            # step: the memory order's two calls would step twice per batch
            engine = getattr(getattr(getattr(backward_fn, "__self__", None), "distributed_type", None), "name", None)
            if engine in ("DEEPSPEED", "MEGATRON_LM"):
                raise MaskSubError(f"order='memory' calls backward_fn twice, but under {engine} "
                                   "accelerator.backward also steps the optimizer: use MaskSub(..., "
                                   "order='fused') or loss(x, y, criterion) with one accelerator.backward")
        bw = backward_fn if backward_fn is not None else plain_backward(scaler)
        ms: dict[str, Any] = {}

        def main() -> tuple[Tensor, Tensor]:
            logits = self.forward_main(x)
            loss = self._main_loss(criterion, logits, y)
            ms["main"] = logits
            return loss, logits.detach()

        def sub(target: Tensor) -> Tensor:
            logits = self.forward_sub(x)
            ms["sub"] = logits
            return relaxed_loss(logits, target, self.kind)

        fsdp = hasattr(model, "set_requires_gradient_sync")
        norms = _GradNorms(model, scaler, sync) if grad_norms else None
        kw = dict(order=self.order, weights=(self.main_weight, self.sub_weight), loss_scale=loss_scale,
                  backward=bw, no_sync=no_sync or (lambda: ddp_no_sync(model)), sync=sync,
                  # FSDP2 keeps an unsynced gradient inside, out of ``.grad``: a step that measures
                  # the main branch's gradient norm syncs it (one extra reduce-scatter on those steps)
                  sync_main=fsdp and (grad_norms or self.sync_main),
                  after_main=norms.after_main if norms else None)
        if self.branch is None:
            res = two_branch_step(main, None, **kw)
            out = StepOutput(ms["main"].detach(), res.loss_main, loss=res.loss_main)
            if norms:
                out.grad_norm_main = norms.after_main()
            return out
        guard = (_restore_grads_on_error([p for p in model.parameters() if p.requires_grad])
                 if self.order == "memory" else contextlib.nullcontext())
        with guard:
            res = two_branch_step(main, sub, **kw)
        out = StepOutput(res.target, res.loss_main, res.loss_sub, ms["sub"].detach())
        if norms:
            out.grad_norm_main, out.grad_norm_sub = norms.main, norms.after_sub()
        out.loss = out.loss_main * self.main_weight + out.loss_sub * self.sub_weight
        return out

    def loss(self, x: Any, y: Any, criterion: Callable[[Tensor, Any], Tensor]) -> Tensor:
        """The weighted loss of both branches (order fused), with its graph: for a loop whose
        framework runs the backward itself (Lightning's automatic optimization, a trainer's
        ``compute_loss``). The branch losses of this call are in ``self.last``."""
        self.validate(x)
        ms: dict[str, Any] = {}

        def main() -> tuple[Tensor, Tensor]:
            logits = self.forward_main(x)
            return self._main_loss(criterion, logits, y), logits.detach()

        def sub(target: Tensor) -> Tensor:
            logits = self.forward_sub(x)
            ms["sub"] = logits.detach()
            return relaxed_loss(logits, target, self.kind)

        res = two_branch_step(main, sub if self.branch is not None else None, order="fused",
                              weights=(self.main_weight, self.sub_weight), backward=None,
                              no_sync=lambda: ddp_no_sync(self.model))
        self.last = StepOutput(res.target, res.loss_main, res.loss_sub, ms.get("sub"))
        self.last.loss = res.pending.detach()
        return res.pending

    @staticmethod
    def _main_loss(criterion: Callable[[Tensor, Any], Tensor], logits: Tensor, y: Any) -> Tensor:
        loss = criterion(logits, y)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise MaskSubError(f"the criterion must return a scalar loss, got {shape}; use reduction='mean'")
        return loss


class _GradNorms:
    """Each branch's gradient norm, read from what its backward added to ``.grad``. Under DDP the
    main backward runs in ``no_sync`` (local gradients) and the sub one all-reduces the sum, so
    the local parts are averaged over the processes here (one all-reduce of a copy) and the
    norms are those of the synchronized gradients, as one process on the whole batch sees."""

    def __init__(self, model: nn.Module, scaler: torch.amp.GradScaler | None, sync: bool) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.sync = sync
        self.group = None
        if (hasattr(model, "no_sync") and hasattr(model, "require_backward_grad_sync")
                and torch.distributed.is_available() and torch.distributed.is_initialized()):
            self.group = getattr(model, "process_group", None) or torch.distributed.group.WORLD
        self.before = _grads(self.params)
        self.main: Tensor | None = None

    def _mean(self, tensors: list[Tensor]) -> list[Tensor]:
        if self.group is None or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, group=self.group)
        flat /= torch.distributed.get_world_size(self.group)
        return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]

    def _norm(self, tensors: list[Tensor]) -> Tensor:
        norm = torch.nn.utils.get_total_norm(tensors)
        if hasattr(norm, "full_tensor"):  # FSDP2: sharded gradients, the norm of the whole
            norm = norm.full_tensor()
        return norm / self.scale

    def after_main(self) -> Tensor:
        if self.group is None:
            self.main = _norm_of_diff(self.params, self.before, self.scale)
            self.mid = _grads(self.params)
            return self.main
        # what this main backward added, and what was there before it, averaged over ranks
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        zero = torch.zeros(())
        added = [self.params[i].grad.detach() - (self.before[i] if self.before[i] is not None else zero)
                 for i in have]
        was = [self.before[i] if self.before[i] is not None else torch.zeros_like(self.params[i].grad)
               for i in have]
        avg = self._mean(added + was)
        self.main = self._norm(avg[:len(have)])
        self.mid = [None] * len(self.params)
        for k, i in enumerate(have):
            # after a synced sub backward .grad holds mean(before + main + sub)
            self.mid[i] = (avg[k] + avg[len(have) + k]) if self.sync else self.params[i].grad.detach().clone()
        return self.main

    def after_sub(self) -> Tensor:
        added = [p.grad.detach() if m is None else p.grad.detach() - m
                 for p, m in zip(self.params, self.mid, strict=True) if p.grad is not None]
        if self.group is not None and not self.sync:
            added = self._mean(added)
        return self._norm(added)
