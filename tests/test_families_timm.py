"""Every model a user brings: >= 30 timm architectures (tiny configs, 64 px, CPU) and the Hugging
Face text and image heads. For each: the family, a sub output that differs from the main one,
the model restored exactly (state_dict and module tree), and a finite sub/main gradient-norm
ratio at init of at most 100 in every mode it supports (LayerScale models start near 1e-5: no
lower bound). The checks are ``masksub.inspect``'s own, so the tool and the test agree."""

from __future__ import annotations

import pytest
import torch

from masksub.inspect import inspect_model

S4 = dict(depths=(1, 1, 1, 1))
DIMS = dict(dims=(16, 32, 32, 64))
VIT = dict(depth=1, embed_dim=32, num_heads=2, img_size=64)

# name -> (builder keywords, expected mask family). pixel: a CNN stem with BatchNorm, or a token
# model with no slot to drop tokens in and a stem pixel masking does not break (PiT pools a
# token grid, XCiT's local patch interaction and LeViT's attention biases need the full grid):
# 32 px zeroed squares, cost 1x.
MODELS = {
    "vit_tiny_patch16_224": (VIT, "vit"),
    "deit3_small_patch16_224": (VIT, "vit"),
    "vit_little_patch16_reg4_gap_256": (VIT, "vit"),
    "eva02_tiny_patch14_224": (dict(depth=1, embed_dim=32, num_heads=2, img_size=56), "vit"),
    "beitv2_base_patch16_224": (VIT, "beit"),
    "swin_tiny_patch4_window7_224": (dict(depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), embed_dim=16,
                                          img_size=64, window_size=2), "swin"),
    "convnext_atto": ({**S4, **DIMS}, "stem"),
    "convnextv2_atto": ({**S4, **DIMS}, "stem"),
    "convnext_nano": ({**S4, **DIMS}, "stem"),
    "edgenext_xx_small": ({**S4, **DIMS, "heads": (1, 1, 1, 1)}, "stem"),
    "mambaout_femto": ({**S4, **DIMS}, "stem"),
    "poolformerv2_s12": ({}, "stem"),  # MetaFormer factories fix their sizes
    "caformer_s18": ({}, "stem"),
    "davit_tiny": (dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 64), num_heads=(1, 1, 1, 1)), "stem"),
    "resnet18": (dict(layers=[1, 1, 1, 1], channels=[8, 8, 16, 16]), "pixel"),
    "resnet50d": (dict(layers=[1, 1, 1, 1]), "pixel"),
    "seresnext26d_32x4d": (dict(layers=[1, 1, 1, 1]), "pixel"),
    "regnetx_002": ({}, "pixel"),
    "efficientnet_b0": ({}, "pixel"),
    "mobilenetv3_small_050": ({}, "pixel"),
    "mobilenetv4_conv_small": ({}, "pixel"),
    "ghostnet_050": ({}, "pixel"),
    "efficientvit_b0": ({}, "pixel"),
    "inception_next_atto": ({**S4, **DIMS}, "pixel"),
    "repvit_m0_9": ({}, "pixel"),
    "fastvit_t8": ({}, "pixel"),
    "mobilevitv2_050": ({}, "pixel"),
    "hgnetv2_b0": ({}, "pixel"),
    "levit_128s": (dict(img_size=64), "pixel"),
    "pit_ti_224": (dict(img_size=64, depth=(1, 1, 1)), "pixel"),
    "xcit_nano_12_p16_224": (dict(depth=1), "pixel"),
    "cait_xxs24_224": (dict(depth=1, depth_token_only=1, embed_dim=32, num_heads=2, img_size=64), "cait"),
    "vit_relpos_small_patch16_224": (VIT, "vit_relpos"),
    "hiera_tiny_224": (dict(img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), "hiera"),
    "dla34": ({}, "pixel"),
    "cspresnet50": ({}, "pixel"),
}


def build(name, kw):
    """With dropout and drop-path where the builder takes them, so every mode can be checked."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=5, drop_rate=0.1, drop_path_rate=0.1, **kw)
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=5, drop_rate=0.1, **kw)
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear) and not head.weight.any():  # Hiera zeroes a new head: every
        torch.nn.init.normal_(head.weight, std=0.02)                   # output would equal every other
    return model


def check(reports, expected_family):
    by_mode = {r.mode: r for r in reports}
    assert by_mode["mask"].family == expected_family, by_mode["mask"].why
    supported = [r for r in reports if r.family is not None]
    assert "mask" in {r.mode for r in supported}
    for r in supported:
        assert r.restored, (r.mode, r.warnings)
        assert r.sub_equals_main is False, (r.mode, r.warnings)
        assert r.grad_ratio is not None and r.grad_ratio <= 100, (r.mode, r.grad_ratio)  # nan/inf fail too
    return supported


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_timm_architecture(name):
    kw, family = MODELS[name]
    model = build(name, kw)
    size = kw.get("img_size", 64)
    size = size[0] if isinstance(size, tuple) else size
    reports = inspect_model(model, image_size=size, batch=2, repeats=0)
    check(reports, family)


def test_at_least_30_architectures():
    assert len(MODELS) >= 30


def _hf_image():
    from transformers import (
        BeitConfig,
        BeitForImageClassification,
        ConvNextConfig,
        ConvNextForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    small = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                 image_size=64, patch_size=8, num_labels=3, hidden_dropout_prob=0.1, drop_path_rate=0.1)
    return {
        "vit": (ViTForImageClassification(ViTConfig(**{k: v for k, v in small.items() if k != "drop_path_rate"})), "hf_vit"),
        "beit": (BeitForImageClassification(BeitConfig(**small)), "pixel"),
        "convnext": (ConvNextForImageClassification(ConvNextConfig(
            depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 32, 64], num_labels=3, drop_path_rate=0.1)), "stem"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "beit", "convnext"])
def test_hugging_face_image_heads(kind):
    model, family = _hf_image()[kind]
    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    check(inspect_model(model, x, torch.tensor([0, 2]), repeats=0), family)


@pytest.mark.parametrize("head", ["seq", "token", "choice"])
def test_hugging_face_text_heads(head):
    from conftest import tiny_bert
    from transformers import BertConfig, BertForMultipleChoice, BertForTokenClassification

    cfg = dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, num_labels=3, max_position_embeddings=64)
    ids = torch.randint(5, 120, (2, 12))
    ids[:, 0], ids[:, -1] = 1, 2
    if head == "seq":
        model, y = tiny_bert(), torch.tensor([0, 2])
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        fwd = None
    elif head == "token":
        model = BertForTokenClassification(BertConfig(**cfg))
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        y = torch.randint(0, 3, (2 * 12,))
        def fwd(m, b):
            return m(**b).logits.flatten(0, 1)
    else:
        model = BertForMultipleChoice(BertConfig(**cfg))
        x = {"input_ids": ids.view(1, 2, 12).repeat(2, 1, 1), "attention_mask": torch.ones(2, 2, 12, dtype=torch.long)}
        y = torch.tensor([0, 1])
        fwd = None
    reports = inspect_model(model, x, y, repeats=0, modes=("mask", "dropout"), forward_fn=fwd,
                            mask_token_id=3, special_token_ids=[0, 1, 2])
    check(reports, "text")
