"""ViT token removal through timm's patch_drop slot: counts, prefix tokens, restore."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_fails_before_forward, tiny_vit
from torch import nn

import masksub
from masksub import MaskSub, sub_branch
from masksub.branches.vit import TokenRemoval


def capture_block_input(model):
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    return seen, handle


def test_vit_224_16_half_ratio_blocks_see_1_plus_98_tokens():
    model = tiny_vit()
    x = torch.randn(2, 3, 224, 224)
    seen, h = capture_block_input(model)
    model(x)
    with sub_branch(model, "mask", 0.5):
        model(x)
    h.remove()
    assert seen[0].shape[1] == 1 + 196
    assert seen[1].shape[1] == 1 + 98


def test_family_detected_and_patch_drop_restored():
    model = tiny_vit()
    old = model.patch_drop
    ms = MaskSub(model, "mask", 0.5)
    assert ms.branch.name == "vit"
    with ms.sub():
        assert isinstance(model.patch_drop, TokenRemoval)
    assert model.patch_drop is old
    with pytest.raises(RuntimeError, match="boom"), sub_branch(model, "mask", 0.5):
        assert isinstance(model.patch_drop, TokenRemoval)
        raise RuntimeError("boom")
    assert model.patch_drop is old


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_register_prefix_tokens_kept_and_unchanged(ratio):
    model = tiny_vit(img_size=64, reg_tokens=4)
    assert model.num_prefix_tokens == 5
    x = torch.randn(3, 3, 64, 64)
    seen, h = capture_block_input(model)
    model(x)
    with sub_branch(model, "mask", ratio):
        model(x)
    h.remove()
    main, sub = seen
    n = 16
    kept = n - int(ratio * n + 0.5)
    assert sub.shape == (3, 5 + kept, 32)
    torch.testing.assert_close(sub[:, :5], main[:, :5], rtol=0, atol=0)
    for b in range(3):
        # every kept token is one of the image's own patch tokens, none twice
        eq = (sub[b, 5:, None, :] == main[b, None, 5:, :]).all(-1)
        assert (eq.sum(1) == 1).all()
        assert (eq.sum(0) <= 1).all()


def test_no_class_token_keeps_at_least_one_patch():
    model = tiny_vit(img_size=32, class_token=False, global_pool="avg")
    seen, h = capture_block_input(model)
    with sub_branch(model, "mask", 0.9):  # 4 patches: round(3.6) = 4 masked, 1 kept anyway
        out = model(torch.randn(2, 3, 32, 32))
    h.remove()
    assert seen[0].shape[1] == 1
    assert torch.isfinite(out).all()


def test_eva_rope_model_gets_indices():
    import timm

    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, embed_dim=32,
                              num_heads=2, img_size=56, num_classes=5)
    assert model.patch_drop is None
    seen, h = capture_block_input(model)
    with sub_branch(model, "mask", 0.5):
        out = model(torch.randn(2, 3, 56, 56))
    h.remove()
    assert model.patch_drop is None
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert seen[0].shape[1] == 1 + 8


def test_sub_gradient_reaches_every_block_parameter():
    model = tiny_vit(img_size=32)
    ms = MaskSub(model, "mask", 0.5)
    ms.backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks"))
    from masksub.branches import get_family

    detected = [n for n in masksub.family_names() if "mask" in get_family(n).modes]
    assert detected[-1] == "pixel"  # the CNN fallback is tried last


def test_image_size_mismatch_fails_before_any_forward():
    model = tiny_vit(img_size=32)
    ms = MaskSub(model, "mask", 0.5)
    assert_fails_before_forward(
        model, lambda: ms.backward(torch.randn(2, 3, 48, 48), torch.tensor([0, 1]), nn.CrossEntropyLoss()),
        "image size 48x48 does not match the ViT's img_size 32x32")
    dyn = tiny_vit(img_size=32, dynamic_img_size=True)
    out = MaskSub(dyn, "mask", 0.5).backward(torch.randn(2, 3, 48, 48), torch.tensor([0, 1]),
                                            nn.CrossEntropyLoss())
    assert torch.isfinite(out.loss)
