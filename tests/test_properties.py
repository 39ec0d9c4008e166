"""Property tests (hypothesis) over the core's inputs: ratios, batch sizes, image sizes,
dtypes, prefix-token counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masksub import MaskSubError, relaxed_loss
from masksub.branches.masks import block_mask, masked_count, random_mask, random_mask_among
from masksub.branches.pixel import mask_pixels, pixel_count
from masksub.branches.vit import TokenRemoval, kept_count
from masksub.errors import check_ratio

FAST = settings(max_examples=25, deadline=None)
ratios = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@FAST
@given(ratio=ratios, batch=st.integers(1, 5), n=st.integers(1, 80))
def test_random_mask_exact_count_per_row(ratio, batch, n):
    m = random_mask(batch, n, ratio)
    assert m.dtype == torch.bool and m.shape == (batch, n)
    k = masked_count(n, ratio)
    assert m.sum(1).tolist() == [k] * batch
    assert abs(k - ratio * n) <= 0.5


@FAST
@given(ratio=ratios, batch=st.integers(1, 4), n=st.integers(1, 40), data=st.data())
def test_random_mask_among_only_eligible(ratio, batch, n, data):
    bits = data.draw(st.lists(st.booleans(), min_size=batch * n, max_size=batch * n))
    eligible = torch.tensor(bits).view(batch, n)
    m = random_mask_among(eligible, ratio)
    assert not (m & ~eligible).any()
    want = [masked_count(int(c), ratio) for c in eligible.sum(1)]
    assert m.sum(1).tolist() == want


@FAST
@given(ratio=ratios, batch=st.integers(1, 3), h=st.integers(1, 8), w=st.integers(1, 8))
def test_block_mask_exact_count(ratio, batch, h, w):
    m = block_mask(batch, (h, w), ratio)
    assert m.shape == (batch, h * w)
    assert m.sum(1).tolist() == [masked_count(h * w, ratio)] * batch


@FAST
@given(ratio=ratios, batch=st.integers(1, 4), prefix=st.integers(0, 5), n=st.integers(1, 50),
       dtype=dtypes)
def test_token_removal_keeps_prefix_and_a_subset(ratio, batch, prefix, n, dtype):
    x = torch.randn(batch, prefix + n, 6).to(dtype)
    out = TokenRemoval(ratio, prefix)(x)
    keep = kept_count(n, ratio)
    assert keep >= 1
    assert out.shape == (batch, prefix + keep, 6) and out.dtype == dtype
    assert torch.equal(out[:, :prefix], x[:, :prefix])
    for b in range(batch):
        eq = (out[b, prefix:, None] == x[b, None, prefix:]).all(-1)
        assert (eq.sum(1) >= 1).all()  # every kept token is one of the inputs
    out2, idx = TokenRemoval(ratio, prefix, return_indices=True)(x)
    if idx is not None:
        assert idx.shape == (batch, keep) and len(set(idx[0].tolist())) == keep


@FAST
@given(ratio=ratios, batch=st.integers(1, 3), gh=st.integers(1, 5), gw=st.integers(1, 5),
       patch=st.sampled_from([1, 2, 4, 8]), dtype=dtypes)
def test_pixel_mask_fraction_and_alignment(ratio, batch, gh, gw, patch, dtype):
    x = (torch.rand(batch, 2, gh * patch, gw * patch) + 0.5).to(dtype)
    out = mask_pixels(x, ratio, patch)
    assert out.dtype == dtype and out.shape == x.shape
    zero = (out == 0).view(batch, 2, gh, patch, gw, patch)
    cells = zero.all(dim=(1, 3, 5))
    assert (zero.any(dim=(1, 3, 5)) == cells).all()
    assert cells.flatten(1).sum(1).tolist() == [pixel_count(gh * gw, ratio)] * batch


@FAST
@given(h=st.integers(1, 70), w=st.integers(1, 70), patch=st.integers(2, 16))
def test_pixel_mask_rejects_sizes_the_patch_does_not_divide(h, w, patch):
    x = torch.ones(1, 1, h, w)
    if h % patch or w % patch:
        with pytest.raises(MaskSubError, match="not divisible"):
            mask_pixels(x, 0.5, patch)
    else:
        assert mask_pixels(x, 0.5, patch).shape == x.shape


@FAST
@given(batch=st.integers(1, 6), classes=st.integers(1, 12), dtype=dtypes,
       kind=st.sampled_from(["softmax", "sigmoid", "mse"]), scale=st.floats(0.1, 30.0))
def test_relaxed_loss_properties(batch, classes, dtype, kind, scale):
    g = torch.Generator().manual_seed(batch * 100 + classes)
    main = (torch.randn(batch, classes, generator=g) * scale).to(dtype).requires_grad_()
    sub = (torch.randn(batch, classes, generator=g) * scale).to(dtype).requires_grad_()
    loss = relaxed_loss(sub, main, kind)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss >= 0 or kind == "softmax" and loss >= -1e-4
    loss.backward()
    assert main.grad is None and sub.grad is not None and torch.isfinite(sub.grad).all()
    # the loss is lowest when the sub-branch equals the main branch
    same = relaxed_loss(main.detach(), main.detach(), kind)
    assert same <= loss + 1e-3 * max(1.0, abs(loss.item()))


@FAST
@given(value=st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.text(max_size=3),
                       st.booleans(), st.none()))
def test_check_ratio_accepts_exactly_unit_interval(value):
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and not math.isnan(value) and 0 <= value < 1)
    if ok:
        assert check_ratio(value) == float(value)
    else:
        with pytest.raises(MaskSubError):
            check_ratio(value)


REAL = settings(max_examples=10, deadline=None)


@REAL
@given(reg=st.integers(0, 4), cls=st.booleans(), batch=st.integers(1, 3), ratio=ratios)
def test_real_vit_prefix_counts(reg, cls, batch, ratio):
    from conftest import tiny_vit

    if not cls and not reg:
        kw = dict(class_token=False, global_pool="avg")
    else:
        kw = dict(class_token=cls, reg_tokens=reg, global_pool="token" if cls else "avg")
    torch.manual_seed(0)
    model = tiny_vit(img_size=32, **kw)  # 2x2 = 4 patch tokens
    prefix = int(cls) + reg
    assert model.num_prefix_tokens == prefix
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.randn(batch, 3, 32, 32)
    model(x)
    from masksub import sub_branch

    with sub_branch(model, "mask", ratio):
        out = model(x)
    assert seen[1].shape == (batch, prefix + kept_count(4, ratio), 32)
    assert torch.equal(seen[1][:, :prefix], seen[0][:, :prefix])
    assert torch.isfinite(out).all()


@REAL
@given(batch=st.integers(2, 3), gh=st.integers(1, 3), gw=st.integers(1, 3), ratio=ratios,
       order=st.sampled_from(["memory", "fused"]), seed=st.integers(0, 2**16))
def test_real_resnet_step_any_size(batch, gh, gw, ratio, order, seed):
    """Batch >= 2: BatchNorm needs two values per channel at a 1x1 feature map.

    fp32 only: at these 1x1 feature maps the *plain* model's bf16 CPU backward gives
    non-finite conv gradients in about half of the runs, differing between identical runs
    (measured here with masksub off), so bf16 is covered by the step tests at sane sizes.
    """
    from conftest import tiny_resnet
    from torch import nn

    from masksub import MaskSub

    torch.manual_seed(seed)  # hypothesis needs a deterministic example
    model = tiny_resnet()
    ms = MaskSub(model, "mask", ratio, patch_size=16, order=order)
    y = torch.zeros(batch, dtype=torch.long)
    out = ms.backward(torch.randn(batch, 3, 16 * gh, 16 * gw), y, nn.CrossEntropyLoss())
    assert out.main_logits.shape == (batch, 5)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
