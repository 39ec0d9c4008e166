"""Tiny real models (timm, Hugging Face) built from config: no downloads, CPU, milliseconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

NUM_CLASSES = 5


def tiny_vit(**kw):
    import timm

    args = dict(pretrained=False, depth=1, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args)


def tiny_beit(**kw):
    import timm

    args = dict(pretrained=False, depth=1, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES, img_size=64)
    args.update(kw)
    return timm.create_model("beitv2_base_patch16_224", **args)


def tiny_swin(**kw):
    import timm

    args = dict(pretrained=False, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), embed_dim=16,
                img_size=64, window_size=2, num_classes=NUM_CLASSES)
    args.update(kw)
    return timm.create_model("swin_tiny_patch4_window7_224", **args)


def tiny_resnet(**kw):
    import timm

    args = dict(pretrained=False, num_classes=NUM_CLASSES, layers=[1, 1, 1, 1], channels=[8, 8, 16, 16])
    args.update(kw)
    return timm.create_model("resnet18", **args)


def tiny_bert(**kw):
    from transformers import BertConfig, BertForSequenceClassification

    args = dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, num_labels=3, max_position_embeddings=64)
    args.update(kw)
    return BertForSequenceClassification(BertConfig(**args))


def assert_fails_before_forward(model, call, match):
    """``call()`` raises MaskSubError(match) before ``model`` has run a single forward."""
    from masksub import MaskSubError

    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(MaskSubError, match=match):
            call()
    finally:
        handle.remove()
    assert calls == [], "the model ran a forward before the error"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
