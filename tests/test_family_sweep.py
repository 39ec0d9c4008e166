"""The sweep: one small model from every timm model module, and the Hugging Face image and text
classification heads, through ``inspect_model``. For every mode a model supports: the family and
why, the model restored exactly, a sub output that differs from the main one, a finite sub/main
gradient ratio <= 100, the masked fraction within 0.1 of the ratio where the family promises one
(counted with forward hooks on the model's own modules), and the FLOPs within the family's
promise. A mode that does not fit is refused with a message (family None), never skipped."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from family_sweep import (
    HF_FAMILY,
    HF_IMAGE,
    HF_TEXT,
    IMG,
    REFUSED,
    SIZE,
    TIMM,
    UNBUILDABLE,
    build_hf,
    build_timm,
)
from torch import nn

from masksub import MaskSub
from masksub.branches import get_family
from masksub.branches.mask_token import TOKEN_NAME
from masksub.inspect import inspect_model

SPECIAL = [0, 1, 2]
MASK_ID = 3


def _inputs(model: nn.Module, x):
    """(name, module, first tensor argument) of every pre-hook call of the model's own modules."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.append((n, a[0].detach())) if a and
                                           isinstance(a[0], torch.Tensor) else None)
               for n, m in model.named_modules() if n]
    return seen, handles


def _run(model, fn):
    seen, handles = _inputs(model, None)
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return seen


def masked_fraction(model: nn.Module, family: str, x, fwd) -> float:
    """What the sub forward masks, counted by hooks on the model's own modules."""
    ms = MaskSub(model, "mask", 0.5 if family != "text" else None, forward_fn=fwd,
                 **({"mask_token_id": MASK_ID, "special_token_ids": SPECIAL} if family == "text" else {}))
    torch.manual_seed(0)
    main = _run(model, lambda: fwd(model, x))
    sub = _run(model, lambda: ms.forward_sub(x))
    if family == "text":
        ids = next(t for n, t in sub if t.dtype == torch.long)
        eligible = ~torch.isin(ids, torch.tensor(SPECIAL + [MASK_ID])) | (ids == MASK_ID)
        return ((ids == MASK_ID).sum() / eligible.sum()).item()
    if family == "pixel":
        img = next(t for n, t in sub if t.ndim == 4)
        cells = img.unfold(2, 32, 32).unfold(3, 32, 32)  # B, C, gh, gw, 32, 32
        return (cells == 0).all(-1).all(-1).all(1).float().mean().item()
    if get_family(family).adds_parameters:  # a mask token in place of masked positions
        token = getattr(model, TOKEN_NAME)
        for _, t in sub:
            for axis in (1, -1) if t.ndim == 4 else (-1,):
                if t.ndim >= 3 and t.shape[axis] == token.shape[0]:
                    frac = (t.movedim(axis, -1) == token).all(-1).float().mean().item()
                    if frac > 0:
                        return frac
        return 0.0
    # token removal: the first of the model's own modules given fewer tokens in the sub forward
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if family == "hf_vit":
        prefix = ms.branch.slot(model)[2]
    for (_, a), (_, b) in zip(main, sub, strict=False):
        if a.ndim == 3 and b.ndim == 3 and a.shape[1] != b.shape[1]:
            return (a.shape[1] - b.shape[1]) / (a.shape[1] - prefix)
    return 0.0


def check(model: nn.Module, family: str, x=None, y=None, fwd=None, size: int = IMG, **options) -> list:
    reports = inspect_model(model, x, y, image_size=size, batch=2, repeats=0, forward_fn=fwd, **options)
    by = {r.mode: r for r in reports}
    if family == REFUSED:
        assert by["mask"].family is None and "no masking family fits" in by["mask"].does, by["mask"]
    else:
        assert by["mask"].family == family, (by["mask"].family, by["mask"].does)
    for r in reports:
        if r.family is None:  # refused, with a message saying why
            assert (r.mode != "mask" or family == REFUSED) and r.does, r
            continue
        assert r.why and r.restored, (r.mode, r.warnings)
        assert r.sub_equals_main is False, (r.mode, r.warnings)
        assert r.grad_ratio is not None and math.isfinite(r.grad_ratio) and r.grad_ratio <= 100, (r.mode, r.grad_ratio)
        bad = [w for w in r.warnings if "at init (LayerScale" not in w]
        assert not bad, (r.mode, bad)
        promise = r.expected_cost
        if promise < 1.0:  # tokens removed: cheaper, by at most the promise where blocks dominate
            assert r.flop_ratio < 0.95, (r.mode, r.flop_ratio)
        else:
            assert 0.9 <= r.flop_ratio <= 1.1, (r.mode, r.flop_ratio)
    if family != REFUSED and get_family(family).masks_ratio:
        fwd_ = fwd or (lambda m, b: (m(**b) if isinstance(b, dict) else m(b)))
        xx = x if x is not None else torch.randn(2, int(getattr(model, "in_chans", 3) or 3), size, size)

        def logits(m, b):
            out = fwd_(m, b)
            return getattr(out, "logits", out)
        frac = masked_fraction(model, family, xx, logits)
        want = 0.15 if family == "text" else 0.5
        assert abs(frac - want) <= 0.1, (family, frac)
    return reports


def test_the_sweep_covers_every_timm_module():
    import timm

    modules = {m for m in timm.models.list_modules() if timm.list_models(module=m)}
    assert modules == set(TIMM) | set(UNBUILDABLE), modules ^ (set(TIMM) | set(UNBUILDABLE))
    assert len(HF_IMAGE) >= 10 and len(HF_TEXT) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(TIMM))
def test_timm_module(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_timm(module)
        check(model, TIMM[module][2], size=SIZE.get(module, IMG))


@pytest.mark.slow
@pytest.mark.parametrize("kind", HF_IMAGE)
def test_hugging_face_image_head(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_hf(kind)
        x = {"pixel_values": torch.randn(2, 3, IMG, IMG)}
        check(model, HF_FAMILY[kind], x, torch.tensor([0, 3]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", HF_TEXT)
def test_hugging_face_text_head(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_hf(kind)
        ids = torch.randint(4, 64, (2, 12))
        ids[:, 0], ids[:, -1] = 1, 2
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        check(model, "text", x, torch.tensor([0, 3]), mask_token_id=MASK_ID, special_token_ids=SPECIAL)
