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

from ..branches import MODES, DropSub, Family, PathSub, unwrap
from ..branches.drop import _drop_path_slots
from ..branches.masks import masked_count
from ..branches.vit import kept_count
from ..errors import MaskSubError
from ..loss import relaxed_loss
from ..step import MaskSub, default_forward

# Why a family was chosen, by family name (the detection rule each family's ``matches`` applies).
WHY = {
    "custom": "the model's forward takes mask_ratio (or mask_fn= was given)",
    "text": "a Hugging Face model whose forward takes input_ids",
    "swin": "a timm SwinTransformer: windows over a fixed grid, tokens cannot be removed",
    "beit": "a timm Beit: relative position bias over a fixed grid, tokens cannot be removed",
    "vit_token": "chosen by family='vit_token'",
    "hf_vit": "a Hugging Face ViT / DeiT: absolute position embedding, then a dropout slot to remove tokens in",
    "cait": "a timm Cait: its pos_drop slot runs after the position embedding, before any class token",
    "vit_relpos": "a timm VisionTransformerRelPos: relative position bias over a fixed grid, tokens cannot be removed",
    "hiera": "a timm Hiera: its own mask-unit patch dropout (patch_drop_rate) removes 32 px units",
    "vit": "has timm's patch_drop slot after the position embedding (VisionTransformer, Eva)",
    "stem": "its stem (model.stem) is a conv ending in a LayerNorm: zeroed pixels would make that norm divide by sqrt(eps)",
    "pixel": "has a Conv2d and no more specific family fits: zeroed pixel squares",
    "dropout": "DropSub works for any model with dropout layers",
    "droppath": "PathSub works for any model with drop-path (stochastic depth)",
}
# What the sub forward should cost relative to the main one, per family (above 1.5x this: warn).
EXPECTED_COST = {"vit": 0.5, "hf_vit": 0.5, "cait": 0.5, "hiera": 0.5}


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
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        cost = "-" if self.cost is None else f"{self.cost:.2f}x"
        ratio = "-" if self.grad_ratio is None else f"{self.grad_ratio:.3g}"
        head = f"{self.mode:9s} family={self.family or '-'}  cost={cost}  grad sub/main={ratio}"
        lines = [head, f"  why:  {self.why}", f"  does: {self.does}"]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def load_model(spec: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """A timm model name (random init, no download), or ``module:function`` returning a model."""
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
    return timm.create_model(spec, pretrained=False, num_classes=num_classes, **kwargs)


def _grid(model: nn.Module, x: Tensor) -> tuple[int, int] | None:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return None
    ps = ps if isinstance(ps, (tuple, list)) else (ps, ps)
    return x.shape[-2] // int(ps[0]), x.shape[-1] // int(ps[1])


def describe(model: nn.Module, branch: Family, ratio: float, x: Any) -> str:
    """What the sub-branch does to this input, in words and counts (no forward run)."""
    inner = unwrap(model)
    img = x if isinstance(x, Tensor) else (x.get("pixel_values") if isinstance(x, dict) else None)
    name = branch.name
    if isinstance(branch, DropSub):
        slots, scope = branch.slots(inner)
        return f"{len(slots)} dropout rate(s) set to {ratio:g} ({scope} scope)"
    if isinstance(branch, PathSub):
        paths, empty = _drop_path_slots(inner)
        return f"{len(paths)} drop-path rate(s) +{ratio:g}, {len(empty)} empty slot(s) get drop-path {ratio:g}"
    if name in ("vit", "hf_vit", "cait") and img is not None:
        if name in ("vit", "cait"):
            grid, prefix = _grid(inner, img), int(getattr(inner, "num_prefix_tokens", 0)) if name == "vit" else 0
        else:
            from ..branches.vit import _hf_vit_embeddings

            emb = _hf_vit_embeddings(inner)
            ps = emb.patch_embeddings.patch_size
            ps = ps if isinstance(ps, (tuple, list)) else (ps, ps)
            grid = (img.shape[-2] // ps[0], img.shape[-1] // ps[1])
            prefix = 1 + int(getattr(emb, "distillation_token", None) is not None)
        if grid:
            n = grid[0] * grid[1]
            return f"keeps {kept_count(n, ratio)} of {n} patch tokens (+{prefix} prefix token(s)); the rest removed"
    if name in ("pixel", "stem") and img is not None:
        px = getattr(branch, "patch_size", None) or getattr(branch, "region_px", 32)
        n = (img.shape[-2] // px) * (img.shape[-1] // px)
        where = "zeroed in the image" if name == "pixel" else "replaced by a mask token after the stem's norm"
        from ..branches.pixel import pixel_count

        k = pixel_count(n, ratio) if name == "pixel" else masked_count(n, ratio)
        return f"{k} of {n} {px}x{px} px squares {where}"
    if name in ("swin", "beit", "vit_token", "vit_relpos") and img is not None:
        grid = _grid(inner, img)
        r = branch.region_tokens(inner)
        if grid:
            n = (grid[0] // r) * (grid[1] // r)
            return f"{masked_count(n, ratio)} of {n} regions of {r}x{r} patch tokens replaced by a mask token"
    if name == "hiera":
        n = math.prod(inner.mask_spatial_shape)
        keep = int(n * (1 - ratio))
        return f"keeps {keep} of {n} mask units ({'x'.join(map(str, inner.mask_unit_size))} tokens each); the rest removed"
    if name == "text":
        return f"{ratio:.0%} of the non-special, non-padding tokens of each sequence -> [MASK]"
    return f"{name} sub-branch at ratio {ratio:g}"


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


def inspect_model(model: nn.Module, x: Any = None, y: Any = None, *, modes: tuple[str, ...] = MODES,
                  ratio: float | None = None, image_size: int = 64, batch: int = 4, repeats: int = 3,
                  measure: bool = True, forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                  **family_options: Any) -> list[ModeReport]:
    """One :class:`ModeReport` per mode. ``x``/``y`` default to a random image batch and labels
    (``image_size``); ``measure=False`` skips timing and gradients (family and description only),
    ``repeats=0`` the timing alone.
    The model is left as it was, except for a mask token a family adds (as ``MaskSub`` would)."""
    fwd = forward_fn or default_forward
    if x is None:
        in_chans = int(getattr(model, "in_chans", 3) or 3)
        x = torch.randn(batch, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model.train()
    reports = []
    for mode in modes:
        try:
            ms = MaskSub(model, mode, ratio, forward_fn=forward_fn, **family_options)
        except MaskSubError as e:
            reports.append(ModeReport(mode, None, "no sub-branch", str(e)))
            continue
        branch = ms.branch
        rep = ModeReport(mode, branch.name, WHY.get(branch.name, type(branch).__doc__ or ""),
                         describe(model, branch, ms.ratio, x))
        reports.append(rep)
        if not measure:
            continue
        try:
            _measure(model, ms, fwd, x, y, rep, repeats)
        except MaskSubError as e:
            rep.warnings.append(f"the sub-branch failed on this input: {e}")
    return reports


def _measure(model: nn.Module, ms: MaskSub, fwd: Callable, x: Any, y: Any, rep: ModeReport, repeats: int) -> None:
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
    rep.sub_equals_main = bool(torch.equal(out.sub_logits, out.main_logits))
    rep.restored = _same(before, _state(model))

    def main_step() -> None:
        crit(fwd(model, x), y).backward()

    def sub_step() -> None:
        relaxed_loss(ms.forward_sub(x), main_out).backward()

    if repeats > 0:
        t_main, t_sub = _timed(main_step, repeats), _timed(sub_step, repeats)
        model.zero_grad(set_to_none=True)
        rep.cost = t_sub / t_main
    if not math.isfinite(rep.grad_ratio):
        rep.warnings.append(f"the sub-branch gradient is not finite (main {gm:.3g}, sub {gs}): it would never train")
    elif rep.grad_ratio > 100:
        rep.warnings.append(f"the sub gradient is {rep.grad_ratio:.3g}x the main one at init: clipping would "
                            "silence the main branch; try another family or mask_fn=")
    elif rep.grad_ratio < 1e-3:
        rep.warnings.append(f"the sub gradient is {rep.grad_ratio:.2g}x the main one at init (LayerScale models "
                            "start near 1e-5; otherwise the sub-branch barely trains)")
    if rep.sub_equals_main:
        rep.warnings.append("the sub-branch output equals the main one: it drops nothing (a model in eval()? "
                            "rates at 0?)")
    if not rep.restored:
        rep.warnings.append("the model was not restored exactly after the sub-branch")
    expected = EXPECTED_COST.get(rep.family or "", 1.0)
    if rep.cost is not None and rep.cost > 1.5 * expected:
        rep.warnings.append(f"the sub forward+backward costs {rep.cost:.2f}x a main one; this family should cost "
                            f"about {expected:g}x")

