"""Issue 12's smaller fixes: HF BEiT is an image model, pixel_values as a keyword and in dict
batches, per-sequence text masking (multiple choice), short texts, Eva restored exactly,
token removal for HF ViT / CaiT, and the messages."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_resnet
from torch import nn

from masksub import MaskSub, MaskSubError, sub_branch
from masksub.branches.text import TextMask

SMALL = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
             image_size=64, patch_size=8, num_labels=3)


def test_hf_beit_is_not_text_and_takes_pixel_values_keyword():
    from transformers import BeitConfig, BeitForImageClassification

    model = BeitForImageClassification(BeitConfig(**SMALL))
    ms = MaskSub(model, "mask")
    assert ms.branch.name == "pixel"  # its config has a vocab_size, but it takes no input_ids
    x = torch.randn(2, 3, 64, 64)
    seen = []
    h = model.beit.embeddings.patch_embeddings.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with ms.sub():
        model(pixel_values=x)  # Hugging Face's usual call: a keyword, no positional input
    h.remove()
    zero_squares = (seen[0].view(2, 3, 2, 32, 2, 32) == 0).all(dim=(1, 3, 5))
    assert zero_squares.sum().item() == 4  # 2 of 4 squares per image
    out = ms.backward({"pixel_values": x}, torch.tensor([0, 2]), nn.CrossEntropyLoss())  # dict batch
    assert torch.isfinite(out.loss_sub)


def test_hf_vit_removes_tokens_in_its_embedding_dropout_slot():
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(**SMALL))
    ms = MaskSub(model, "mask")
    assert ms.branch.name == "hf_vit"
    seen = []
    model.vit.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    keys, dropout = set(model.state_dict()), model.vit.embeddings.dropout
    ms.backward({"pixel_values": torch.randn(2, 3, 64, 64)}, torch.tensor([0, 1]), nn.CrossEntropyLoss())
    assert seen == [65, 33]  # cls + 64 patches; cls + 32
    assert model.vit.embeddings.dropout is dropout and set(model.state_dict()) == keys


def test_cait_removes_tokens_before_its_class_attention():
    import timm

    model = timm.create_model("cait_xxs24_224", pretrained=False, num_classes=3, depth=1, depth_token_only=1,
                              embed_dim=32, num_heads=2, img_size=64)
    ms = MaskSub(model, "mask")
    assert ms.branch.name == "cait"
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    ms.backward(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    assert seen == [16, 8]


def _bert_ids(shape, n_real):
    ids = torch.full(shape, 0)
    ids[..., 0] = 1
    ids[..., 1:1 + n_real] = torch.randint(5, 120, (*shape[:-1], n_real))
    ids[..., 1 + n_real] = 2
    return ids, (ids != 0).long()


@pytest.mark.parametrize("choices", [2, 3, 4])
def test_multiple_choice_masks_each_sequence(choices):
    """(batch, choices, tokens): 15% of each choice's 18 real tokens is 3 per choice (before:
    counted across choices, 2 or 3 choices masked nothing)."""
    fam = TextMask(mask_token_id=3, special_token_ids=[0, 1, 2])
    ids, attn = _bert_ids((2, choices, 24), 18)
    masked = fam.mask(ids, attn, 0.15) == 3
    assert masked.sum(-1).tolist() == [[3] * choices] * 2


def test_short_texts_and_min_masked():
    ids, attn = _bert_ids((4, 8), 3)
    assert (TextMask(mask_token_id=3, special_token_ids=[0, 1, 2]).mask(ids, attn, 0.15) == 3).sum() == 0
    masked = TextMask(mask_token_id=3, special_token_ids=[0, 1, 2], min_masked=1).mask(ids, attn, 0.15) == 3
    assert masked.sum(-1).tolist() == [1, 1, 1, 1]
    assert not (masked & (ids < 5)).any(), "special tokens and padding stay"
    with pytest.raises(MaskSubError, match="min_masked"):
        TextMask(mask_token_id=3, min_masked=-1)


def test_eva_patch_drop_restored_exactly():
    import timm

    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=3, depth=1,
                              embed_dim=32, num_heads=2, img_size=56)
    assert "patch_drop" not in model._modules and model.__dict__["patch_drop"] is None
    with sub_branch(model, "mask"):
        assert "patch_drop" in model._modules
        model(torch.randn(1, 3, 56, 56))
    assert "patch_drop" not in model._modules and model.__dict__["patch_drop"] is None


def test_299px_is_advised_a_resize_not_patch_size_1():
    with pytest.raises(MaskSubError, match="288x288") as e:
        MaskSub(tiny_resnet(), "mask").validate(torch.randn(1, 3, 299, 299))
    assert "e.g. 1)" not in str(e.value)


def test_switching_mode_keeps_a_config_with_mask_options_working():
    model = tiny_bert(hidden_dropout_prob=0.1)
    with pytest.warns(UserWarning, match="ignores the masking option"):
        ms = MaskSub(model, "dropout", mask_token_id=3, special_token_ids=[0])
    assert ms.branch.name == "dropout"


def test_rates_print_short():
    with pytest.raises(MaskSubError, match=r"got 1\.05;"):
        MaskSub(tiny_resnet(), "mask", ratio=float(torch.tensor(1.05, dtype=torch.float32)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                                  img_size=32, num_classes=3, drop_path_rate=float(torch.tensor(0.95)))
    with pytest.raises(MaskSubError, match=r"drop-path 0\.95 \+ delta 0\.1 reaches 1"):
        MaskSub(model, "droppath")
