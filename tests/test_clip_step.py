"""The open_clip MaskSub step on a tiny CLIP built from a custom config, synthetic pairs."""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from masksub.errors import MaskSubError  # noqa: E402
from masksub.integrations.clip import ClipMaskSub, masked_image_tower  # noqa: E402
from masksub.loss import relaxed_loss  # noqa: E402

IMG, PATCH = 32, 8  # 16 patches
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMG, "patch_size": PATCH, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def model_name(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "masksub-tiny-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d / "masksub-tiny-clip.json")
    return "masksub-tiny-clip"


def make(model_name, seed=0):
    torch.manual_seed(seed)
    return open_clip.create_model(model_name)


def pairs(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(1, 64, (n, 12), generator=g)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sub_image_tower_sees_class_token_plus_half_the_patches(model_name):
    model = make(model_name).train()
    counts = []
    model.visual.transformer.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
    images, texts = pairs()
    out = ClipMaskSub(model, ratio=0.5).backward(images, texts)
    n = (IMG // PATCH) ** 2
    assert counts == [1 + n, 1 + n // 2]
    assert out.loss_sub is not None and out.loss_sub > 0 and torch.isfinite(out.loss)
    assert isinstance(model.visual.patch_dropout, torch.nn.Identity)  # slot restored


@pytest.mark.parametrize("text,order", [("shared", "fused"), ("shared", "memory"), ("detached", "fused")])
def test_gradients_are_the_halved_sum_of_both_losses(model_name, text, order):
    images, texts = pairs()
    model = make(model_name).train()
    torch.manual_seed(5)
    ClipMaskSub(model, ratio=0.5, text=text, order=order).backward(images, texts)
    got = grads(model)

    ref = make(model_name).train()
    lossf = open_clip.ClipLoss()
    img, txt, scale = ref(images, texts)
    lpi, lpt = lossf.get_logits(img, txt, scale)
    torch.manual_seed(5)  # the same token subset
    with masked_image_tower(ref, 0.5):
        img_s, _, scale_s = ref(images, None)
    t = txt if text == "shared" else txt.detach()
    spi, spt = lossf.get_logits(img_s, t, scale_s)
    loss_main = lossf(img, txt, scale)
    loss_sub = (relaxed_loss(spi, lpi) + relaxed_loss(spt, lpt)) / 2
    (0.5 * loss_main + 0.5 * loss_sub).backward()
    want = grads(ref)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)

    # the sub loss reaches the text tower only when the text features are shared
    ref.zero_grad()
    (0.5 * lossf(*ref(images, texts))).backward()
    text_param = "token_embedding.weight"
    same = torch.allclose(got[text_param], ref.token_embedding.weight.grad, rtol=1e-5, atol=1e-7)
    assert same == (text == "detached")


def test_plain_step_is_the_clip_loss(model_name):
    images, texts = pairs()
    model = make(model_name).train()
    out = ClipMaskSub(model, mode="none").backward(images, texts)
    assert out.loss_sub is None
    ref = make(model_name).train()
    want = open_clip.ClipLoss()(*ref(images, texts))
    torch.testing.assert_close(out.loss_main, want.detach())


def test_training_steps_lower_both_losses(model_name):
    images, texts = pairs(n=8)
    model = make(model_name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ms = ClipMaskSub(model)
    first = ms.backward(images, texts)
    for _ in range(15):
        opt.step()
        opt.zero_grad()
        last = ms.backward(images, texts)
    assert last.loss_main < first.loss_main
    assert last.loss_sub < first.loss_sub


def test_bad_options_are_refused(model_name):
    model = make(model_name)
    with pytest.raises(MaskSubError, match="text must be"):
        ClipMaskSub(model, text="frozen")
    with pytest.raises(MaskSubError, match="mode"):
        ClipMaskSub(model, mode="dropout")
    with pytest.raises(MaskSubError, match="ratio"):
        ClipMaskSub(model, ratio=1.2)
    with pytest.raises(MaskSubError, match="visual"):
        ClipMaskSub(torch.nn.Linear(2, 2))


def test_token_removal_module_is_reused_and_slot_restored(model_name):
    """One removal module per tower (a compiled graph must see the same one every step)."""
    model = make(model_name)
    original = model.visual.patch_dropout
    seen = []
    for ratio in (0.5, 0.25):
        with masked_image_tower(model, ratio):
            seen.append(model.visual.patch_dropout)
            assert seen[-1].ratio == ratio
        assert model.visual.patch_dropout is original
    assert seen[0] is seen[1] and seen[0] is not original


def test_open_clip_tower_is_a_core_family(model_name):
    """The core detects open_clip's vision tower by its attributes (open_clip never imported there)."""
    from masksub.branches import build_branch, sub_branch

    model = make(model_name).train()
    assert build_branch(model.visual, "mask").name == "open_clip_vit"
    counts = []
    model.visual.transformer.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
    with sub_branch(model.visual, "mask", 0.75):
        model.visual(pairs()[0])
    assert counts == [1 + 4]  # class token + 16 patches * 0.25
