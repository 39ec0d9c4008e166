"""``MaskSubTrainer``: the Hugging Face ``Trainer`` with MaskSub's sub-branch in each step.

Built on the Trainer's own hook: only ``compute_loss`` is overridden, so ``Trainer.training_step``
(context parallel, LOMO, DeepSpeed keywords, cache emptying, SageMaker) runs unchanged and makes
the one backward of each micro-batch. In ``compute_loss`` the main branch runs (the model's own
loss on its labels, Eq. 1), then the sub-branch (15% of the real tokens replaced by [MASK], or
heavier dropout / drop-path) on the same inputs without labels; it learns the main branch's
detached prediction (Eq. 3). Both are halved.

Two orders (``masksub_order``):

- ``"fused"``: ``compute_loss`` returns ``loss_main / 2 + loss_sub / 2`` and the Trainer's one
  ``accelerator.backward`` does both branches: DeepSpeed steps once, DDP all-reduces once,
  accumulation and loss scaling are the Trainer's. Both graphs live until that backward
  (peak memory about that of two forwards).
- ``"memory"``: the main branch's backward runs inside ``compute_loss`` (in ``no_sync``, through
  ``accelerator.backward``), freeing its activations before the sub forward; the Trainer's backward
  then does the sub-branch and the one all-reduce. Peak memory stays that of plain training.
  Only where the backward does not own the optimizer step: plain, DDP (``torchrun``), not
  DeepSpeed, FSDP or LOMO.
- ``None`` (default): ``"memory"`` where it is allowed, else ``"fused"``.

In both orders the main forward runs in DDP's ``no_sync()`` (DDP arms its all-reduce at forward
time), so gradients are reduced once per synced micro-batch, as in a plain Trainer step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.training_args import OptimizerNames

from ..branches import MODES, Family, build_branch, resolve_ratio, sub_branch, unwrap
from ..errors import MaskSubError
from ..loss import KINDS, relaxed_loss
from ..step import ORDERS, ddp_no_sync, logits_of, two_branch_step

SUB_MODES = ("none", *MODES)
#: The heads whose sub-branch loss MaskSubTrainer knows (class-name suffixes of transformers).
HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice", "ForQuestionAnswering")
IGNORE_INDEX = -100  # transformers' label for positions without a loss (padding, special tokens, sub-words)
_STEP_OWNING = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")  # their backward / reduction is not ours to split


class MaskSubTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss adds MaskSub's sub-branch.

    ``masksub_mode``: ``"mask"`` (default; text family, [MASK] on ``masksub_ratio`` of the
    non-special, non-padding tokens, paper 15%), ``"dropout"`` (DropSub), ``"droppath"``
    (PathSub) or ``"none"`` (the plain Trainer step, for baselines that log the same way).
    ``masksub_weights``: (main, sub) loss weights, the paper's (0.5, 0.5).
    ``masksub_family``: a family name or a ``masksub.branches.Family`` instance to use instead of
    the text family built from ``processing_class`` (the tokenizer).
    ``masksub_order``: ``"memory"``, ``"fused"`` or ``None`` (memory where the engine allows it).
    ``masksub_kind``: the relaxed loss; by default it follows the head: softmax, sigmoid for
    ``problem_type="multi_label_classification"``, squared error for regression
    (``num_labels == 1`` or ``problem_type="regression"``).

    Heads: sequence classification (single-label, multi-label, regression), token classification
    (sub loss over the labelled positions only, as the main loss), multiple choice and extractive
    question answering (start and end logits). Another head: subclass and override
    ``masksub_sub_loss``. Labels are the Trainer's ``label_names``.

    Logs ``loss`` (the weighted sum that is trained), ``loss_main`` and ``loss_sub``. Model losses
    are taken as per-micro-batch means and divided by the accumulation steps by the Trainer,
    unless the Trainer's own rule says the main loss is already scaled for accumulation (a
    ``compute_loss_func``, which is given ``num_items_in_batch``): then only the sub loss is
    divided, here.
    """

    def __init__(self, *args: Any, masksub_mode: str = "mask", masksub_ratio: float | None = None,
                 masksub_weights: tuple[float, float] = (0.5, 0.5),
                 masksub_family: str | Family | None = None, masksub_kind: str | None = None,
                 masksub_order: str | None = None, **kwargs: Any) -> None:
        if masksub_mode not in SUB_MODES:
            raise MaskSubError(f"masksub_mode must be one of {SUB_MODES}, got {masksub_mode!r}")
        if (len(tuple(masksub_weights)) != 2
                or any(not isinstance(w, (int, float)) or w < 0 for w in masksub_weights)):
            raise MaskSubError(f"masksub_weights must be two non-negative numbers (main, sub), got {masksub_weights!r}")
        if masksub_kind is not None and masksub_kind not in KINDS:
            raise MaskSubError(f"masksub_kind must be one of {KINDS} or None (follow the head), got {masksub_kind!r}")
        if masksub_order is not None and masksub_order not in ORDERS:
            raise MaskSubError(f"masksub_order must be one of {ORDERS} or None (auto), got {masksub_order!r}")
        super().__init__(*args, **kwargs)
        # Sequence-classification heads accept **kwargs but ignore num_items_in_batch and return a
        # per-batch mean: without this the Trainer skips the 1/accumulation scaling (measured with
        # transformers 5.24 and BertForSequenceClassification: the plain Trainer's gradient at
        # 2 x 4 accumulation is 2.0x that of one batch of 8). This also applies to mode "none".
        self.model_accepts_loss_kwargs = False
        self.masksub_mode = None if masksub_mode == "none" else masksub_mode
        self.masksub_weights = (float(masksub_weights[0]), float(masksub_weights[1]))
        self.masksub_branch: Family | None = None
        self.masksub_ratio = 0.0
        self.masksub_kind = masksub_kind
        inner = unwrap(self.model)
        if self.masksub_mode is not None:
            overridden = type(self).masksub_sub_loss is not MaskSubTrainer.masksub_sub_loss
            if not overridden and not type(inner).__name__.endswith(HEADS):
                raise MaskSubError(
                    f"MaskSubTrainer knows the sub-branch loss of the heads {', '.join('*' + h for h in HEADS)}; "
                    f"{type(inner).__name__} is none of them: use one of those heads, or subclass "
                    "MaskSubTrainer and override masksub_sub_loss(sub_outputs, main_outputs, inputs)"
                )
            self.masksub_branch = self._build_branch(inner, masksub_family)
            self.masksub_ratio = resolve_ratio(self.masksub_mode, masksub_ratio, type(self.masksub_branch))
            self.masksub_branch.prepare(inner)
        elif masksub_ratio is not None:
            raise MaskSubError("masksub_mode='none' has no sub-branch: drop masksub_ratio or set masksub_mode='mask'")
        self.masksub_order = self._pick_order(masksub_order)
        self._ms_sums: Tensor | None = None
        self._ms_last_step = 0

    def _build_branch(self, model: nn.Module, family: str | Family | None) -> Family:
        if isinstance(family, Family):
            return family
        mode = self.masksub_mode
        assert mode is not None
        if mode != "mask":
            return build_branch(model, mode)
        if family not in (None, "text"):
            return build_branch(model, mode, family)
        tok = self.processing_class
        tok = getattr(tok, "tokenizer", tok)  # a processor wraps its tokenizer
        if tok is None or getattr(tok, "mask_token_id", None) is None:
            raise MaskSubError(
                "MaskSubTrainer(masksub_mode='mask') needs the tokenizer to find the [MASK] id: pass "
                "processing_class=tokenizer (one with a mask token), or masksub_family=TextMask("
                "mask_token_id=..., special_token_ids=[...])"
            )
        return build_branch(model, mode, "text", tokenizer=tok)

    def _pick_order(self, order: str | None) -> str:
        """``memory`` needs a backward that neither steps (DeepSpeed, LOMO) nor reduces (FSDP)."""
        engine = self.accelerator.distributed_type.name
        why = None
        if engine in _STEP_OWNING:
            why = f"the {engine} engine owns the backward's reduction / optimizer step"
        elif self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            why = "LOMO updates the weights inside each backward"
        if order is None:
            return "fused" if why else "memory"
        if order == "memory" and why and self.masksub_mode is not None:
            raise MaskSubError(f"masksub_order='memory' makes two backward passes, but {why}: use "
                               "masksub_order='fused' (one backward of the summed loss) or None (auto)")
        return order

    # -- the loss: the Trainer's own training_step calls this, then backward once --------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Tensor | Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, Any]:
        """Main loss (+ sub loss while training); see the module docstring for the two orders."""
        if not model.training:  # evaluation / prediction: the plain loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        missing = [k for k in self.label_names if k not in inputs]
        if missing or not self.label_names:
            raise MaskSubError(
                f"MaskSubTrainer needs the labels {self.label_names or ['labels']} in each batch for the main "
                f"branch's loss; missing {missing or 'label_names'} (set TrainingArguments(label_names=[...]) "
                "when the model's labels are named otherwise)"
            )
        f = 1.0 / self.current_gradient_accumulation_steps
        # The Trainer's rule (training_step): a loss already scaled for accumulation is not divided
        # by the accumulation steps; ``d`` is what the Trainer will multiply the returned loss by.
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                          or self.compute_loss_func is not None)
        d = 1.0 if scaled else f
        w_main, w_sub = self.masksub_weights
        # the Trainer pops the labels (label smoothing, compute_loss_func): keep them for the sub loss
        labels = {k: inputs[k] for k in self.label_names}
        if self.masksub_branch is None:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            self._accumulate(loss.detach().mean() * d, None)
            return (loss, outputs) if return_outputs else loss
        held: dict[str, Any] = {}

        def main() -> tuple[Tensor, dict[str, Any]]:
            loss_main, outputs = super(MaskSubTrainer, self).compute_loss(
                model, dict(inputs), True, num_items_in_batch)
            if return_outputs:
                held["outputs"] = outputs
            return (loss_main.mean() if loss_main.ndim else loss_main), _detached(outputs)  # DataParallel

        def sub(main_outputs: dict[str, Any]) -> Tensor:
            sub_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}
            with sub_branch(model, self.masksub_mode, self.masksub_ratio, family=self.masksub_branch):
                sub_outputs = model(**sub_inputs)
            return self.masksub_sub_loss(sub_outputs, main_outputs, {**inputs, **labels})

        # weights in the returned loss's units: the sub loss is a per-micro-batch mean
        res = two_branch_step(main, sub, order=self.masksub_order,
                              weights=(w_main, w_sub * (f if scaled else 1.0)),
                              backward=lambda loss: self.accelerator.backward(loss * d), run_last=False,
                              no_sync=lambda: ddp_no_sync(model))
        self._accumulate(res.loss_main * d, res.loss_sub * f)
        loss = res.pending
        if self.masksub_order == "memory":  # its gradient is in .grad already; the value is logged
            loss = loss + res.loss_main * w_main
        return (loss, held["outputs"]) if return_outputs else loss

    def masksub_kind_for(self, model: nn.Module) -> str:
        """The relaxed-loss kind the head's own loss calls for (read per step: a sequence
        classification head sets ``problem_type`` at its first forward with labels)."""
        if self.masksub_kind is not None:
            return self.masksub_kind
        cfg = getattr(unwrap(model), "config", None)
        problem = getattr(cfg, "problem_type", None)
        if problem == "multi_label_classification":
            return "sigmoid"
        if problem == "regression" or getattr(cfg, "num_labels", None) == 1:
            return "mse"
        return "softmax"

    def masksub_sub_loss(self, sub_outputs: Any, main_outputs: Any, inputs: dict[str, Any]) -> Tensor:
        """Eq. (3) for the standard heads; ``main_outputs`` are detached. Override for another head."""
        kind = self.masksub_kind_for(self.model)
        start, end = _get(main_outputs, "start_logits"), _get(main_outputs, "end_logits")
        if start is not None and end is not None:  # extractive QA: a distribution over positions, twice
            return (relaxed_loss(_get(sub_outputs, "start_logits"), start, "softmax")
                    + relaxed_loss(_get(sub_outputs, "end_logits"), end, "softmax")) / 2
        main, sub = logits_of(main_outputs), logits_of(sub_outputs)
        labels = inputs.get(self.label_names[0]) if self.label_names else None
        if main.ndim == 3:
            if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(main.shape[:2]):
                raise MaskSubError(
                    f"per-token logits {tuple(main.shape)} need per-token labels of shape {tuple(main.shape[:2])} "
                    f"(token classification), got {None if labels is None else tuple(labels.shape)}"
                )
            keep = labels != IGNORE_INDEX  # as the main loss: labelled positions only
            if not bool(keep.any()):
                return sub.sum() * 0.0
            return relaxed_loss(sub[keep], main[keep], kind)
        if main.ndim != 2:
            raise MaskSubError(f"unsupported logits shape {tuple(main.shape)}: expected (batch, classes) or "
                               "(batch, tokens, classes); override masksub_sub_loss for this head")
        return relaxed_loss(sub, main, kind)

    # -- logging ----------------------------------------------------------------------------
    def _accumulate(self, loss_main: Tensor, loss_sub: Tensor | None) -> None:
        """Sum (accumulation-scaled) branch losses on device; read at log time, no sync per step."""
        if self._ms_sums is None:  # first micro-batch since the last log (or since a resume)
            self._ms_last_step = self.state.global_step
        vals = torch.stack([loss_main.detach().float(),
                            (loss_sub if loss_sub is not None else loss_main.new_zeros(())).detach().float()])
        self._ms_sums = vals if self._ms_sums is None else self._ms_sums + vals

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``loss_main`` / ``loss_sub`` (means per optimizer step) to each training log."""
        if "loss" in logs and self._ms_sums is not None:
            steps = max(1, self.state.global_step - self._ms_last_step)
            sums = nested_gather(self._ms_sums.unsqueeze(0), self.args.parallel_mode).reshape(-1, 2).mean(0)
            logs["loss_main"] = round(float(sums[0]) / steps, 6)
            if self.masksub_branch is not None:
                logs["loss_sub"] = round(float(sums[1]) / steps, 6)
            self._ms_sums = None
        super().log(logs, start_time)


def _get(outputs: Any, key: str) -> Any:
    return outputs.get(key) if hasattr(outputs, "get") else getattr(outputs, key, None)


def _detached(outputs: Any) -> dict[str, Any]:
    """The output's tensors, detached: the sub-branch's targets (and nothing keeps the graph)."""
    items = outputs.items() if hasattr(outputs, "items") else {"logits": logits_of(outputs)}.items()
    return {k: v.detach() for k, v in items if isinstance(v, Tensor) and k != "loss"}


__all__ = ["HEADS", "MaskSubTrainer", "ORDERS", "SUB_MODES"]
