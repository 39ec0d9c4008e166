"""Mask-token families: BEiT v2 (random / block) and Swin (32 px regions) on real timm models."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_fails_before_forward, tiny_beit, tiny_swin, tiny_vit
from torch import nn

from masksub import MaskSub, sub_branch
from masksub.branches.mask_token import TOKEN_NAME


def patch_embed_outputs(model, ms, x):
    """patch_embed output of the main forward and, inside the sub-branch, after masking."""
    seen = []

    def grab(m, a, out):
        seen.append(out.detach().clone())

    h = model.patch_embed.register_forward_hook(grab)
    model(x)
    h.remove()
    with ms.sub():
        h = model.patch_embed.register_forward_hook(grab)  # runs after the masking hook
        model(x)
        h.remove()
    return seen


def masked_positions(main, sub, token):
    is_token = (sub == token.detach()).all(-1)
    unchanged = (sub == main).all(-1)
    assert (is_token ^ unchanged).all(), "every token is either the mask token or untouched"
    return is_token


@pytest.mark.parametrize("block", [False, True])
def test_beit_masked_fraction_is_ratio(block):
    model = tiny_beit(img_size=128)  # 8x8 tokens
    ms = MaskSub(model, "mask", 0.5, block=block)
    assert ms.branch.name == "beit"
    x = torch.randn(3, 3, 128, 128)
    main, sub = patch_embed_outputs(model, ms, x)
    m = masked_positions(main, sub, getattr(model, TOKEN_NAME))
    assert m.shape == (3, 64)
    assert m.sum(1).tolist() == [32, 32, 32]


def test_swin_masks_32px_regions():
    model = tiny_swin(img_size=128)  # patch 4: 32x32 tokens, regions of 8x8 tokens: 4x4 regions
    ms = MaskSub(model, "mask", 0.5)
    assert ms.branch.name == "swin"
    main, sub = patch_embed_outputs(model, ms, torch.randn(2, 3, 128, 128))
    m = masked_positions(main, sub, getattr(model, TOKEN_NAME))
    assert m.shape == (2, 32, 32)
    regions = m.view(2, 4, 8, 4, 8)
    assert (regions == regions[:, :, :1, :, :1]).all(), "each 8x8-token region is masked whole"
    assert m.float().mean(dim=(1, 2)).tolist() == [0.5, 0.5]


def test_mask_token_is_a_parameter_that_gets_gradient():
    model = tiny_swin()
    ms = MaskSub(model, "mask", 0.5)
    token = getattr(model, TOKEN_NAME)
    assert any(p is token for p in model.parameters())
    assert TOKEN_NAME in model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ms.backward(torch.randn(2, 3, 64, 64), torch.tensor([0, 3]), nn.CrossEntropyLoss())
    assert token.grad is not None and token.grad.abs().sum() > 0
    before = token.detach().clone()
    opt.step()
    assert not torch.equal(before, token)


def test_adding_the_token_does_not_move_the_global_rng():
    model = tiny_beit()
    torch.manual_seed(3)
    MaskSub(model, "mask")
    a = torch.rand(3)
    torch.manual_seed(3)
    b = torch.rand(3)
    assert torch.equal(a, b)


def test_vit_token_mode_is_opt_in_and_main_forward_unchanged():
    model = tiny_vit(img_size=64)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    plain = model(x)
    ms = MaskSub(model, "mask", 0.5, family="vit_token")
    torch.testing.assert_close(ms.forward_main(x), plain, rtol=0, atol=0)
    main, sub = patch_embed_outputs(model, ms, x)
    m = masked_positions(main, sub, getattr(model, TOKEN_NAME))
    assert m.sum(1).tolist() == [8, 8]


def test_swin_size_not_divisible_by_region_fails_before_forward():
    model = tiny_swin(img_size=64)
    ms = MaskSub(model, "mask", 0.5)
    assert_fails_before_forward(
        model, lambda: ms.backward(torch.randn(2, 3, 48, 48), torch.tensor([0, 1]), nn.CrossEntropyLoss()),
        "not divisible by the 32 px mask region")


def test_sub_branch_context_warns_when_token_made_late():
    model = tiny_beit()
    with pytest.warns(UserWarning, match="not in your optimizer"), sub_branch(model, "mask", 0.5):
        model(torch.randn(1, 3, 64, 64))
    assert hasattr(model, TOKEN_NAME)


@pytest.mark.parametrize(("name", "channels_first"), [("swinv2_cr_tiny_224", True),
                                                      ("swinv2_tiny_window8_256", False)])
def test_swin_v2_variants_token_layout(name, channels_first):
    import timm

    model = timm.create_model(name, pretrained=False, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                              embed_dim=16, img_size=64, window_size=2, num_classes=5)
    ms = MaskSub(model, "mask", 0.5)
    assert ms.branch.name == "swin"
    main, sub = patch_embed_outputs(model, ms, torch.randn(2, 3, 64, 64))
    if channels_first:  # 16 channels on a 16x16 grid: the layout cannot be guessed from shapes
        main, sub = main.permute(0, 2, 3, 1), sub.permute(0, 2, 3, 1)
    m = masked_positions(main, sub, getattr(model, TOKEN_NAME))
    assert m.shape == (2, 16, 16)
    assert m.float().mean(dim=(1, 2)).tolist() == [0.5, 0.5]
    regions = m.view(2, 2, 8, 2, 8)
    assert (regions == regions[:, :, :1, :, :1]).all()
