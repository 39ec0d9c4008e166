"""``MaskSubTrainer``: the Hugging Face ``Trainer`` with MaskSub's sub-branch in each step.

Each micro-batch runs the main branch (the model's own loss on ``labels``, Eq. 1) and the
sub-branch (15% of the real tokens replaced by [MASK], or heavier dropout / drop-path) that
learns the main branch's detached prediction (Eq. 3), both halved. The two backward passes go
through ``accelerator.backward`` as the Trainer's own step does, so mixed precision, gradient
accumulation and distribution behave as in plain Trainer training; the first backward runs in
``accelerator.no_sync(model)`` so gradients are reduced once per micro-batch, not twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.training_args import OptimizerNames

from ..branches import MODES, Family, build_branch, resolve_ratio, sub_branch, unwrap
from ..errors import MaskSubError
from ..loss import relaxed_loss
from ..step import logits_of

SUB_MODES = ("none", *MODES)


class MaskSubTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step adds MaskSub's sub-branch.

    ``masksub_mode``: ``"mask"`` (default; text family, [MASK] on ``masksub_ratio`` of the
    non-special, non-padding tokens, paper 15%), ``"dropout"`` (DropSub), ``"droppath"``
    (PathSub) or ``"none"`` (the plain Trainer step, for baselines that log the same way).
    ``masksub_weights``: (main, sub) loss weights, the paper's (0.5, 0.5).
    ``masksub_family``: a family name or a ``masksub.branches.Family`` instance to use instead of
    the text family built from ``processing_class`` (the tokenizer).
    The relaxed loss is the softmax form, or the squared error for regression heads
    (``config.num_labels == 1``, STS-B); ``masksub_kind`` overrides.

    Logs ``loss`` (the weighted sum that is trained), ``loss_main`` and ``loss_sub``.
    Model losses are taken as per-batch means (as sequence-classification heads compute them),
    so both branches are divided by the accumulation steps the same way.
    """

    # Our losses are per-batch means: let the Trainer divide them by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, masksub_mode: str = "mask", masksub_ratio: float | None = None,
                 masksub_weights: tuple[float, float] = (0.5, 0.5),
                 masksub_family: str | Family | None = None, masksub_kind: str | None = None,
                 **kwargs: Any) -> None:
        if masksub_mode not in SUB_MODES:
            raise MaskSubError(f"masksub_mode must be one of {SUB_MODES}, got {masksub_mode!r}")
        if (len(tuple(masksub_weights)) != 2
                or any(not isinstance(w, (int, float)) or w < 0 for w in masksub_weights)):
            raise MaskSubError(f"masksub_weights must be two non-negative numbers (main, sub), got {masksub_weights!r}")
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
        inner = unwrap(self.model)
        num_labels = getattr(getattr(inner, "config", None), "num_labels", None)
        self.masksub_kind = masksub_kind or ("mse" if num_labels == 1 else "softmax")
        if self.masksub_mode is not None:
            self.masksub_branch = self._build_branch(inner, masksub_family)
            self.masksub_ratio = resolve_ratio(self.masksub_mode, masksub_ratio, type(self.masksub_branch))
            self.masksub_branch.prepare(inner)
        elif masksub_ratio is not None:
            raise MaskSubError("masksub_mode='none' has no sub-branch: drop masksub_ratio or set masksub_mode='mask'")
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

    # -- the step ---------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Tensor | Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Main forward + backward, then sub forward + backward, the Trainer's way."""
        if self.masksub_branch is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._accumulate(loss, None)
            return loss
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            if "labels" not in inputs:
                raise MaskSubError("MaskSubTrainer needs 'labels' in each batch for the main branch's loss")
            with self.compute_loss_context_manager():
                loss_main, outputs = self.compute_loss(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            main_logits = batch_logits(outputs).detach()
            del outputs
            if self.args.n_gpu > 1:
                loss_main = loss_main.mean()
            scale = self._ga_scale(num_items_in_batch, main_logits.shape[0])
            if scale.get("main") is not None:
                loss_main = loss_main * scale["main"]
            kwargs = self._backward_kwargs()
            w_main, w_sub = self.masksub_weights
            # Reduce gradients once per micro-batch: the main backward never syncs.
            with self.accelerator.no_sync(model):
                self.accelerator.backward(loss_main * w_main, **kwargs)

            sub_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            del inputs
            with self.compute_loss_context_manager(), sub_branch(
                model, self.masksub_mode, self.masksub_ratio, family=self.masksub_branch
            ):
                sub_logits = logits_of(model(**sub_inputs))
            loss_sub = relaxed_loss(sub_logits, main_logits, self.masksub_kind) * scale["sub"]
            self.accelerator.backward(loss_sub * w_sub, **kwargs)
        loss_main, loss_sub = loss_main.detach(), loss_sub.detach()
        self._accumulate(loss_main, loss_sub)
        return loss_main * w_main + loss_sub * w_sub

    def _ga_scale(self, num_items_in_batch: Tensor | int | None, batch: int) -> dict[str, Any]:
        """Factors that make both losses sum to per-step means over accumulated micro-batches."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        if not scaled:
            f = 1.0 / self.current_gradient_accumulation_steps
            return {"main": f, "sub": f}
        # The main loss was normalised over the whole accumulated batch (a compute_loss_func);
        # the sub loss is a per-sample mean, so weight it by this micro-batch's share.
        if num_items_in_batch is None:
            return {"main": None, "sub": 1.0 / self.current_gradient_accumulation_steps}
        return {"main": None, "sub": batch / num_items_in_batch}

    def _backward_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.args.optim in [OptimizerNames.LOMO, OptimizerNames.ADALOMO]:
            kwargs["learning_rate"] = self._get_learning_rate()
        if self.accelerator.distributed_type.name == "DEEPSPEED":
            kwargs["scale_wrt_gas"] = False
        return kwargs

    # -- logging ----------------------------------------------------------------------------
    def _accumulate(self, loss_main: Tensor, loss_sub: Tensor | None) -> None:
        """Sum (accumulation-scaled) branch losses on device; read at log time, no sync per step."""
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
            self._ms_last_step = self.state.global_step
        super().log(logs, start_time)


def batch_logits(outputs: Any) -> Tensor:
    """The logits of a Hugging Face model output (object, dict or (loss, logits) tuple)."""
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and len(outputs) > 1 and isinstance(outputs[1], Tensor):
        return outputs[1]
    return logits_of(outputs)


__all__ = ["MaskSubTrainer", "SUB_MODES", "batch_logits"]
