"""Hugging Face text heads (sequence, token, multiple choice) through ``masksub.inspect``: the
family, a sub output that differs from the main one, the model restored exactly, and a finite
sub/main gradient ratio of at most 100 in every mode. Every timm module and the Hugging Face
image heads are in ``tests/test_family_sweep.py``."""

from __future__ import annotations

import pytest
import torch

from masksub.inspect import inspect_model


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
