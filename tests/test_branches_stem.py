"""Conv + LayerNorm stems (ConvNeXt, FocalNet, EdgeNeXt, MambaOut): mask token after the stem's
norm, a gradient of the main branch's order at init, and a model that trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from masksub import MaskSub
from masksub.branches.mask_token import TOKEN_NAME


def tiny(name, **kw):
    import timm

    sizes = {
        "convnext_atto": dict(depths=(1, 1, 1, 1), dims=(16, 32, 32, 64)),
        "focalnet_tiny_srf": dict(depths=(1, 1, 1, 1), embed_dim=16),
        "edgenext_xx_small": dict(depths=(1, 1, 1, 1), dims=(16, 32, 32, 64), heads=(1, 1, 1, 1)),
        "mambaout_femto": dict(depths=(1, 1, 1, 1), dims=(16, 32, 32, 64)),
    }[name]
    if name == "focalnet_tiny_srf":  # its factory fixes depths: build the class (same model, srf)
        from timm.models.focalnet import FocalNet

        return FocalNet(num_classes=10, focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3), **sizes, **kw)
    return timm.create_model(name, pretrained=False, num_classes=10, **sizes, **kw)


STEMS = ["convnext_atto", "focalnet_tiny_srf", "edgenext_xx_small", "mambaout_femto"]


@pytest.mark.parametrize("name", STEMS)
def test_conv_layernorm_stem_gets_the_stem_family_and_a_sane_gradient(name):
    model = tiny(name)
    ms = MaskSub(model, "mask")
    assert ms.branch.name == "stem"
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 7, 3, 2])
    out = ms.backward(x, y, nn.CrossEntropyLoss(), grad_norms=True)
    ratio = float(out.grad_norm_sub / out.grad_norm_main)
    assert 1e-3 < ratio < 10, ratio  # zeroed pixels gave 1e7 .. inf here
    assert not torch.equal(out.sub_logits, out.main_logits)


@pytest.mark.parametrize("name", ["convnext_atto", "focalnet_tiny_srf"])
def test_pixel_masking_of_these_stems_is_the_singularity(name):
    """Why the family exists: zeroed 32 px squares blow the sub gradient up (issue 12)."""
    model = tiny(name)
    ms = MaskSub(model, "mask", family="pixel")
    out = ms.backward(torch.randn(4, 3, 64, 64), torch.tensor([1, 7, 3, 2]), nn.CrossEntropyLoss(), grad_norms=True)
    assert not float(out.grad_norm_sub / out.grad_norm_main) < 1e3


def test_regions_after_the_stem_are_the_32px_squares():
    model = tiny("convnext_atto")  # stride-4 stem: a 32 px square is 8x8 cells
    ms = MaskSub(model, "mask", 0.5)
    seen = []
    x = torch.randn(2, 3, 128, 128)
    h = model.stages.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    model(x)
    with ms.sub():
        model(x)
    h.remove()
    main, sub = seen
    token = getattr(model, TOKEN_NAME).detach().view(1, -1, 1, 1)
    is_tok = (sub == token).all(1)
    assert (is_tok ^ (sub == main).all(1)).all(), "each cell is the token or untouched"
    regions = is_tok.view(2, 4, 8, 4, 8)
    assert (regions == regions[:, :, :1, :, :1]).all(), "whole 8x8-cell regions"
    assert is_tok.float().mean(dim=(1, 2)).tolist() == [0.5, 0.5]


def test_stem_is_restored_and_token_is_a_parameter():
    model = tiny("mambaout_femto")  # NHWC stem output
    stem = model.stem
    ms = MaskSub(model, "mask")
    keys = set(model.state_dict())
    assert TOKEN_NAME in keys and any(p is getattr(model, TOKEN_NAME) for p in model.parameters())
    ms.backward(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    assert model.stem is stem and set(model.state_dict()) == keys


def _fashion(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from masksub.train.data import fashion_mnist

    try:
        x, y = fashion_mnist("train")
    except Exception as e:  # noqa: BLE001 - the Debian package is set up by scripts/setup.sh
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    x = x[:n].float().div(255).sub(0.286).div(0.353)
    return F.interpolate(x, size=64, mode="bilinear", align_corners=False), y[:n].long()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_atto", "focalnet_tiny_srf"])
def test_trains_on_fashion_mnist_with_clipping(name):
    """A few hundred 64 px Fashion-MNIST images, clipping at 1.0: with pixel masking FocalNet's
    clipped gradient was 0 (inf sub norm) and it never learned."""
    x, y = _fashion(256)
    model = tiny(name, in_chans=1)
    ms = MaskSub(model, "mask")
    assert ms.branch.name == "stem"
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    crit = nn.CrossEntropyLoss()
    losses = []
    for _epoch in range(3):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            out = ms.backward(x[i:i + 32], y[i:i + 32], crit, grad_norms=True)
            assert torch.isfinite(out.grad_norm_sub)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(out.loss_main))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
