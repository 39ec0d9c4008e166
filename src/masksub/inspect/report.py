"""The report behind ``masksub inspect``: one row per mode, measured on this machine.

For each mode: the family chosen and why, what the sub-branch does to the input (tokens kept,
regions masked, dropouts raised), its forward+backward cost relative to a main forward+backward,
the sub/main gradient-norm ratio at init, whether the model came back exactly, and warnings.
"""

from __future__ import annotations

import importlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..branches import MODES, Family, unwrap
from ..branches.drop import drop_path_slots, dropout_slots, set_rates
from ..branches.mask_token import TOKEN_NAME
from ..errors import MaskSubError
from ..loss import relaxed_loss
from ..step import MaskSub, default_forward


@dataclass
class ModeReport:
    """One mode of one model. ``cost`` and ``grad_ratio`` are None where not measured."""

    mode: str
    family: str | None
    why: str
    does: str
    cost: float | None = None
    grad_ratio: float | None = None
    sub_equals_main: bool | None = None
    restored: bool | None = None
    expected_cost: float | None = None
    flop_ratio: float | None = None  # sub forward FLOPs / main forward FLOPs
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        cost = "-" if self.cost is None else f"{self.cost:.2f}x"
        ratio = "-" if self.grad_ratio is None else f"{self.grad_ratio:.3g}"
        flops = "-" if self.flop_ratio is None else f"{self.flop_ratio:.2f}x"
        head = f"{self.mode:9s} family={self.family or '-'}  cost={cost}  flops={flops}  grad sub/main={ratio}"
        lines = [head, f"  why:  {self.why}", f"  does: {self.does}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def load_model(spec: str, num_classes: int = 10, *, default_img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model name (random init, no download), or ``module:function`` returning a model.
    ``default_img_size``: a timm model that takes an ``img_size`` (and is not given one in ``kwargs``)
    is built for it, so the report is for the model the user trains; a CNN is built as it is."""
    if ":" in spec:  # the builder gets the keywords only (its own class count)
        mod, _, fn = spec.partition(":")
        try:
            builder = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise MaskSubError(f"cannot load {spec!r}: {e}; give module:function that returns an nn.Module") from e
        model = builder(**kwargs)
        if not isinstance(model, nn.Module):
            raise MaskSubError(f"{spec} returned {type(model).__name__}, not an nn.Module")
        return model
    import timm

    if not timm.is_model(spec):
        close = timm.list_models(f"*{spec.split('_')[0]}*")[:5]
        raise MaskSubError(f"timm has no model {spec!r}" + (f"; close: {', '.join(close)}" if close else ""))
    if default_img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(spec, pretrained=False, num_classes=num_classes, img_size=default_img_size,
                                     **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    try:
        return timm.create_model(spec, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if "keyword argument" not in str(e):
            raise
        bad = [k for k in kwargs if repr(k) in str(e) or f"'{k}'" in str(e)] or sorted(kwargs)
        raise MaskSubError(f"timm's {spec} does not take the builder keyword(s) {', '.join(bad)} "
                           f"(--kw {bad[0]}=...): {e}") from None


def describe(model: nn.Module, branch: Family, ratio: float, x: Any) -> str:
    """What the sub-branch does to this input, in words and counts (no forward run): the family's
    own description."""
    return branch.describe(unwrap(model), ratio, x)


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _state(model: nn.Module) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """Weights and buffers (BatchNorm running statistics aside: any train-mode forward moves
    them), the printed module tree, and each module's class and plain attributes."""
    inner = unwrap(model)
    tree = {n: (type(m).__name__, sorted(m._modules), {k: v for k, v in vars(m).items()
                                                       if isinstance(v, (int, float, str, type(None)))})
            for n, m in inner.named_modules()}
    state = {k: v.detach().clone() for k, v in inner.state_dict().items() if k.rsplit(".", 1)[-1] not in _RUNNING}
    return state, repr(inner), tree


def _same(a: tuple, b: tuple) -> bool:
    sa, ra, pa = a
    sb, rb, pb = b
    return ra == rb and pa == pb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _timed(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _check_input(model: nn.Module, fwd: Callable[[nn.Module, Any], Tensor], x: Any) -> None:
    """One main forward before anything is measured: a model that cannot take this input (a ViT
    built for 224 px given 64 px) is told so in one line, not with the model's own assertion."""
    try:
        with torch.no_grad():
            fwd(model, x)
    except MaskSubError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's model is reported, not hidden
        img = x.get("pixel_values") if isinstance(x, dict) else x
        shape = "x".join(map(str, img.shape[-2:])) if isinstance(img, Tensor) and img.ndim == 4 else None
        built = next((m.img_size for m in unwrap(model).modules()
                      if getattr(m, "strict_img_size", False) and getattr(m, "img_size", None) is not None), None)
        hint = ""
        if built is not None:
            built = "x".join(map(str, built if isinstance(built, (tuple, list)) else (built, built)))
            hint = f"; it was built for {built} images: use that size, or build it with img_size=<your size>"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        what = f"image size {shape}" if shape else "this input"
        raise MaskSubError(f"{type(unwrap(model)).__name__} cannot run on {what} "
                           f"({type(e).__name__}: {first}){hint}") from None


def inspect_model(model: nn.Module, x: Any = None, y: Any = None, *, modes: tuple[str, ...] = MODES,
                  ratio: float | None = None, image_size: int = 64, batch: int = 4, repeats: int = 3,
                  measure: bool = True, forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                  **family_options: Any) -> list[ModeReport]:
    """One :class:`ModeReport` per mode. ``x``/``y`` default to a random image batch and labels
    (``image_size``); ``measure=False`` skips timing and gradients (family and description only),
    ``repeats=0`` the timing alone.
    The model is left as it was, except for a mask token a family adds (as ``MaskSub`` would)."""
    for what, value in (("batch", batch), ("image_size", image_size), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if what == "repeats" else 1):
            raise MaskSubError(f"{what} must be an int >= {0 if what == 'repeats' else 1}, got {value!r}")
    fwd = forward_fn or default_forward
    if x is None:
        in_chans = int(getattr(model, "in_chans", 3) or 3)
        x = torch.randn(batch, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model.train()
    if measure:
        _check_input(model, fwd, x)
    reports: list[ModeReport] = []
    cache: dict[str, Any] = {}
    for mode in modes:
        try:
            ms = MaskSub(model, mode, ratio, forward_fn=forward_fn, **family_options)
        except MaskSubError as e:
            reports.append(ModeReport(mode, None, "no sub-branch", str(e)))
            continue
        branch = ms.branch
        rep = ModeReport(mode, branch.name, branch.why or (type(branch).__doc__ or ""),
                         describe(model, branch, ms.ratio, x), expected_cost=branch.expected_cost(unwrap(model)))
        reports.append(rep)
        if not measure:
            continue
        try:
            ms.validate(x)
            _measure(model, ms, fwd, x, y, rep, repeats, cache)
        except MaskSubError as e:  # the family refuses this model or input: said as a refusal
            rep.family, rep.why, rep.does = None, "no sub-branch", str(e)
            rep.warnings.append(f"the sub-branch refused this model or input: {e}")
    return reports


def classifier(model: nn.Module) -> nn.Module | None:
    """The model's classifier head: timm ``get_classifier()``, Hugging Face ``classifier``, else
    the last Linear."""
    inner = unwrap(model)
    get = getattr(inner, "get_classifier", None)
    head = get() if callable(get) else getattr(inner, "classifier", None)
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return head
    linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _zero_head(head: nn.Module | None) -> bool:
    params = list(head.parameters()) if head is not None else []
    return bool(params) and not any(bool(p.detach().any()) for p in params)


def _outputs(model: nn.Module, fwd: Callable, x: Any, head: nn.Module | None) -> tuple[Tensor, Tensor | None]:
    """Logits, and what the head was given (the features), of one forward."""
    seen: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            seen.append(args[0].detach().clone())

    handle = head.register_forward_pre_hook(hook) if head is not None else None
    try:
        with torch.no_grad():
            out = fwd(model, x)
    finally:
        if handle is not None:
            handle.remove()
    return out, (seen[-1] if seen else None)


def _zero_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Weights that start at exactly 0 (SwinV2's post-norms, LeViT's last BatchNorms, zero heads):
    a residual branch behind one adds nothing at init, so dropping it changes nothing yet."""
    return [(n, p) for n, p in model.named_parameters() if p.ndim >= 1 and "bias" not in n.rsplit(".", 1)[-1]
            and n != TOKEN_NAME and not bool(p.detach().any())]


def _differs_once_trained(model: nn.Module, ms: MaskSub, fwd: Callable, x: Any) -> list[str]:
    """The zero-initialised weights that hide the sub-branch at init: set to small random values
    (then put back to exact zeros), does the sub output differ? Their names, or [] if not."""
    zeros = _zero_weights(unwrap(model))
    if not zeros:
        return []
    try:
        with torch.no_grad():
            for _, p in zeros:
                p.normal_(0.0, 0.02, generator=torch.Generator(device=p.device).manual_seed(0))
        same, _ = _compare(model, ms, fwd, x, retry=False)
    finally:
        with torch.no_grad():
            for _, p in zeros:
                p.zero_()
    return [] if same else [n for n, _ in zeros]


def _compare(model: nn.Module, ms: MaskSub, fwd: Callable, x: Any, retry: bool = True) -> tuple[bool, bool]:
    """(sub equals main, head is zero): one main and one sub forward with every dropout and
    drop-path of the model at 0 except what the sub-branch itself raises, compared on the features
    the head is given (a zero-initialised head makes every logit equal), so neither dropout left on
    nor a zero head hides what the sub-branch does."""
    inner = unwrap(model)
    rates = [(m, a) for m, a in dropout_slots(inner, "all")[0]] + drop_path_slots(inner)[0]
    head = classifier(inner)
    same = True
    with set_rates((m, a, 0.0) for m, a in rates):
        main, main_feat = _outputs(model, fwd, x, head)
        for seed in range(8 if retry else 1):  # drop-path on a small batch may keep every sample once
            torch.manual_seed(seed)
            with ms.sub():
                sub, sub_feat = _outputs(model, fwd, x, head)
            same = torch.equal(main, sub)
            if main_feat is not None and sub_feat is not None and main_feat.shape == sub_feat.shape:
                same = torch.equal(main_feat, sub_feat)
            if not same:
                break
    return same, _zero_head(head)


def _flops(model: nn.Module, fwd: Callable, x: Any, ms: MaskSub | None = None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # with grad: its module tracker hooks autograd, which a parameter output under no_grad breaks
        if ms is None:
            fwd(model, x)
        else:
            with ms.sub():
                fwd(model, x)
    return counter.get_total_flops()
def _measure(model: nn.Module, ms: MaskSub, fwd: Callable, x: Any, y: Any, rep: ModeReport, repeats: int,
             cache: dict[str, Any]) -> None:
    before = _state(model)
    with torch.no_grad():
        main_out = fwd(model, x)
    if y is None:
        y = torch.randint(0, main_out.shape[-1], (main_out.shape[0],), generator=torch.Generator().manual_seed(1))
    crit = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    out = ms.backward(x, y, crit, grad_norms=True)
    model.zero_grad(set_to_none=True)
    gm, gs = float(out.grad_norm_main), float(out.grad_norm_sub)
    rep.grad_ratio = gs / gm if gm > 0 else math.inf
    rep.sub_equals_main, zero_head = _compare(model, ms, fwd, x)
    hidden = _differs_once_trained(model, ms, fwd, x) if rep.sub_equals_main else []
    if hidden:
        rep.sub_equals_main = False
        rep.notes.append(f"{len(hidden)} weight(s) start at 0 ({', '.join(hidden[:3])}{', ...' if len(hidden) > 3 else ''}): "
                         "the sub output equals the main one at init and differs once they train (checked with "
                         "them set to small random values)")
    main_flops = cache["main_flops"] = cache.get("main_flops") or _flops(model, fwd, x)  # once per model
    rep.flop_ratio = _flops(model, fwd, x, ms) / main_flops if main_flops else None
    rep.restored = _same(before, _state(model))

    def main_step() -> None:
        crit(fwd(model, x), y).backward()

    def sub_step() -> None:
        relaxed_loss(ms.forward_sub(x), main_out).backward()

    if repeats > 0:
        t_main, t_sub = _timed(main_step, repeats), _timed(sub_step, repeats)
        model.zero_grad(set_to_none=True)
        rep.cost = t_sub / t_main
    if zero_head:
        rep.notes.append("the classifier head is zero-initialised: every logit is equal at init, so the sub "
                         "gradient is 0 until the first step moves the head; the features it is given were compared")
    if not math.isfinite(rep.grad_ratio):
        rep.warnings.append(f"the sub-branch gradient is not finite (main {gm:.3g}, sub {gs}): it would never train")
    elif rep.grad_ratio > 100:
        rep.warnings.append(f"the sub gradient is {rep.grad_ratio:.3g}x the main one at init: clipping would "
                            "silence the main branch; try another family or mask_fn=")
    elif rep.grad_ratio < 1e-3 and not zero_head:
        rep.warnings.append(f"the sub gradient is {rep.grad_ratio:.2g}x the main one at init (LayerScale models "
                            "start near 1e-5; otherwise the sub-branch barely trains)")
    if rep.sub_equals_main:
        rep.warnings.append("the sub-branch output equals the main one with every other dropout and drop-path "
                            "off: it drops nothing (a model in eval()? rates at 0? slots its forward never runs?)")
    if not rep.restored:
        rep.warnings.append("the model was not restored exactly after the sub-branch")
    expected = rep.expected_cost if rep.expected_cost is not None else 1.0
    if rep.cost is not None and rep.cost > 1.5 * expected:
        rep.warnings.append(f"the sub forward+backward costs {rep.cost:.2f}x a main one; this family should cost "
                            f"about {expected:g}x")
