"""Hugging Face text models (BERT and kin): 15% of real tokens replaced by [MASK].

A forward pre-hook rewrites ``input_ids`` for the sub forward; special tokens ([CLS], [SEP],
...) and padding (``attention_mask == 0``) are never masked.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError
from .base import Family, forward_pre_hook, register_family
from .masks import random_mask_among


@register_family
class TextMask(Family):
    """Options: ``tokenizer=`` (a Hugging Face tokenizer) or ``mask_token_id=`` with
    ``special_token_ids=`` (and ``pad_token_id=``); ``min_masked=`` (default 0).

    Each sequence is masked on its own, also in (batch, choices, tokens) multiple-choice input.
    ``round(ratio * n)`` rounds half up, so at 15% a text of 3 or fewer real tokens gets no mask
    at all; ``min_masked=1`` masks at least one token of every non-empty text.
    """

    name = "text"
    default_ratio = 0.15
    priority = 800
    why = "a Hugging Face model whose forward takes input_ids"

    def __init__(self, tokenizer: Any = None, mask_token_id: int | None = None,
                 special_token_ids: Iterable[int] | None = None, pad_token_id: int | None = None,
                 min_masked: int = 0, **options: Any) -> None:
        super().__init__(**options)
        if isinstance(min_masked, bool) or not isinstance(min_masked, int) or min_masked < 0:
            raise MaskSubError(f"min_masked must be a non-negative int, got {min_masked!r}")
        self.min_masked = min_masked
        if tokenizer is not None:
            mask_token_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
            if special_token_ids is None:
                special_token_ids = tokenizer.all_special_ids
            pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        if mask_token_id is None:
            if tokenizer is not None:
                raise MaskSubError(
                    f"the tokenizer given ({type(tokenizer).__name__}) has no mask token, which the text "
                    "sub-branch puts in place of the masked tokens: pass mask_token_id=... (an id the model's "
                    "embedding has, e.g. the unk or pad id) or use mode='dropout'")
            raise MaskSubError(
                "the text sub-branch needs the [MASK] id: pass tokenizer=your_tokenizer, or "
                "mask_token_id=... and special_token_ids=[...]"
            )
        self.mask_token_id = int(mask_token_id)
        ids = set(int(i) for i in (special_token_ids or ()))
        if pad_token_id is not None:
            ids.add(int(pad_token_id))
        ids.add(self.mask_token_id)
        self.special_ids = torch.tensor(sorted(ids), dtype=torch.long)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """A Hugging Face model that takes ``input_ids`` (not an image model whose config has a
        ``vocab_size``, such as BEiT's)."""
        if not (type(model).__module__.startswith("transformers.") and hasattr(getattr(model, "config", None), "vocab_size")):
            return False
        try:
            return "input_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return False

    def describe(self, model: nn.Module, ratio: float, x: Any) -> str:
        return f"{ratio:.0%} of the non-special, non-padding tokens of each sequence -> [MASK]"

    def validate(self, model: nn.Module, x: Any) -> None:
        if not (isinstance(x, dict) or hasattr(x, "keys")) or "input_ids" not in x:
            raise MaskSubError(f"the text sub-branch takes a dict batch with 'input_ids', got {type(x).__name__}")

    def mask(self, input_ids: Tensor, attention_mask: Tensor | None, ratio: float) -> Tensor:
        if self.special_ids.device != input_ids.device:  # moved once, not every step
            self.special_ids = self.special_ids.to(input_ids.device)
        eligible = ~torch.isin(input_ids, self.special_ids)
        if attention_mask is not None:
            eligible &= attention_mask.bool()
        # One row per sequence: (batch, choices, tokens) masks each choice on its own.
        m = random_mask_among(eligible.reshape(-1, eligible.shape[-1]), ratio, self.min_masked).view(eligible.shape)
        return input_ids.masked_fill(m, self.mask_token_id)

    @contextlib.contextmanager
    def apply(self, model: nn.Module, ratio: float) -> Iterator[None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            if "input_ids" in kwargs:
                kwargs = dict(kwargs)
                kwargs["input_ids"] = self.mask(kwargs["input_ids"], kwargs.get("attention_mask"), ratio)
            elif args:
                attn = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
                args = (self.mask(args[0], attn, ratio), *args[1:])
            return args, kwargs

        with forward_pre_hook(model, hook):
            yield
