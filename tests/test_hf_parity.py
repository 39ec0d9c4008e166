"""MaskSubTrainer against transformers.Trainer, as a property over TrainingArguments and heads.

``masksub_mode="none"`` must be the Trainer, bit for bit: final weights, every logged ``loss``,
checkpoint files, evaluation and prediction. In mask mode every combination trains and logs
``loss_main`` / ``loss_sub``. Tiny BERT models built from a config; random token ids.

The reference Trainer is told the truth about these heads (``accepts_loss_kwargs = False``: they
take ``**kwargs`` but ignore ``num_items_in_batch`` and return a per-batch mean). Without it
the plain Trainer skips the 1/accumulation division and its accumulated gradient is off by the
number of micro-batches, which MaskSubTrainer does not copy.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_hf_trainer import ListDataset  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import BertConfig, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from masksub.branches.text import TextMask  # noqa: E402
from masksub.integrations.hf import MaskSubTrainer  # noqa: E402

PAD, CLS, SEP, MASK = 0, 1, 2, 3
VOCAB, LEN, N = 40, 8, 8
HEADS = ("single", "multi", "regression", "token", "choice", "qa")
Rows = ListDataset  # the Trainer tests' list of rows


def ids(g: torch.Generator, *shape: int) -> torch.Tensor:
    x = torch.randint(5, VOCAB, (*shape, LEN), generator=g)
    x[..., 0], x[..., -1] = CLS, SEP
    x[..., -2] = PAD if shape == () else x[..., -2]
    return x


def dataset(head: str) -> Rows:
    g = torch.Generator().manual_seed(11)
    rows = []
    for _ in range(N):
        if head == "choice":
            x = ids(g, 2)
            rows.append({"input_ids": x, "attention_mask": (x != PAD).long(), "labels": torch.randint(0, 2, (), generator=g)})
            continue
        x = ids(g)
        row = {"input_ids": x, "attention_mask": (x != PAD).long()}
        if head == "single":
            row["labels"] = torch.randint(0, 3, (), generator=g)
        elif head == "multi":
            row["labels"] = torch.randint(0, 2, (3,), generator=g).float()
        elif head == "regression":
            row["labels"] = torch.rand((), generator=g)
        elif head == "token":
            lab = torch.randint(0, 3, (LEN,), generator=g)
            lab[0] = lab[-1] = lab[-2] = -100
            row["labels"] = lab
        else:
            s = int(torch.randint(1, LEN - 3, (), generator=g))
            row["start_positions"], row["end_positions"] = torch.tensor(s), torch.tensor(s + 1)
        rows.append(row)
    return Rows(rows)


def model(head: str):
    from transformers import (
        BertForMultipleChoice,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
    )

    cfg = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    if head == "single":
        m = BertForSequenceClassification(BertConfig(num_labels=3, **cfg))
    elif head == "multi":
        m = BertForSequenceClassification(BertConfig(num_labels=3, problem_type="multi_label_classification", **cfg))
    elif head == "regression":
        m = BertForSequenceClassification(BertConfig(num_labels=1, **cfg))
    elif head == "token":
        m = BertForTokenClassification(BertConfig(num_labels=3, **cfg))
    elif head == "choice":
        m = BertForMultipleChoice(BertConfig(**cfg))
    else:
        m = BertForQuestionAnswering(BertConfig(**cfg))
    m.accepts_loss_kwargs = False  # the truth about these heads (module docstring)
    return m


def sum_loss(outputs, labels, num_items_in_batch=None):
    """A user's compute_loss_func: summed cross-entropy over the whole accumulated batch."""
    logits = outputs["logits"]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())


COMBOS = {
    "ga1": {},
    "ga2": dict(gradient_accumulation_steps=2),
    "ga4": dict(gradient_accumulation_steps=4, per_device_train_batch_size=1),
    "clip": dict(max_grad_norm=0.05),
    "bf16": dict(bf16=True),
    "smooth": dict(label_smoothing_factor=0.1),
    "smooth_ga2": dict(label_smoothing_factor=0.1, gradient_accumulation_steps=2),
    "lossfunc": dict(compute_loss_func=sum_loss),
    "lossfunc_ga2": dict(compute_loss_func=sum_loss, gradient_accumulation_steps=2),
    "avg_tokens_ga2": dict(compute_loss_func=sum_loss, gradient_accumulation_steps=2,
                           average_tokens_across_devices=True),
}
SMOOTHABLE = ("single", "token", "choice")  # LabelSmoother takes integer class labels
LOSSFUNC = ("single", "token", "choice")  # the heads sum_loss speaks for


def cases():
    for head in HEADS:
        for combo, kw in COMBOS.items():
            if "label_smoothing_factor" in kw and head not in SMOOTHABLE:
                continue
            if "compute_loss_func" in kw and head not in LOSSFUNC:
                continue
            yield head, combo


class StopAt(TrainerCallback):
    """An interruption: training stops after this step (its checkpoint written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def run(cls, head: str, combo: str, out, *, mode: str = "none", resume: str | None = None,
        callbacks: list | None = None, **extra):
    kw = dict(COMBOS[combo])
    loss_func = kw.pop("compute_loss_func", None)
    targs = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=5e-2,
                 logging_steps=1, report_to=[], save_strategy="steps", save_steps=2, use_cpu=True, seed=0,
                 disable_tqdm=True, dataloader_num_workers=0,
                 label_names=["start_positions", "end_positions"] if head == "qa" else ["labels"])
    targs.update(kw)
    targs.update(extra)
    ms = {}
    if cls is MaskSubTrainer:
        ms = dict(masksub_mode=mode)
        if mode != "none":
            ms["masksub_family"] = TextMask(mask_token_id=MASK, special_token_ids=[PAD, CLS, SEP], pad_token_id=PAD)
            ms["masksub_ratio"] = 0.5  # a few of the 5 real tokens: a sub-branch that differs
    data = dataset(head)
    t = cls(model=model(head), args=TrainingArguments(**targs), train_dataset=data, eval_dataset=data,
            compute_loss_func=loss_func, callbacks=callbacks, **ms)
    t.train(resume_from_checkpoint=resume)
    return t


def state(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def losses(t, key="loss"):
    return [h[key] for h in t.state.log_history if key in h and "train_runtime" not in h]


@pytest.mark.slow
@pytest.mark.parametrize("head,combo", list(cases()))
def test_mode_none_is_the_trainer_bit_for_bit(head, combo, tmp_path):
    ref = run(Trainer, head, combo, tmp_path / "ref")
    got = run(MaskSubTrainer, head, combo, tmp_path / "got")
    a, b = state(ref), state(got)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert losses(ref) == losses(got) and len(losses(got)) == 4
    for ck in ("checkpoint-2", "checkpoint-4"):
        assert (tmp_path / "ref" / ck / "model.safetensors").read_bytes() == \
               (tmp_path / "got" / ck / "model.safetensors").read_bytes(), ck
    if combo == "ga1":  # evaluation and prediction take the Trainer's own path
        assert ref.evaluate()["eval_loss"] == got.evaluate()["eval_loss"]
        pa, pb = ref.predict(dataset(head)).predictions, got.predict(dataset(head)).predictions
        for x, y in zip(pa if isinstance(pa, tuple) else (pa,), pb if isinstance(pb, tuple) else (pb,), strict=True):
            assert (x == y).all()


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_mode_none_resumes_mid_epoch_like_the_trainer(head, tmp_path):
    """Stopped at step 2 of 4 (mid-epoch), resumed from checkpoint-2: the Trainer's own resume."""
    run(Trainer, head, "ga1", tmp_path / "ref", callbacks=[StopAt(2)])
    ref = run(Trainer, head, "ga1", tmp_path / "ref", resume=str(tmp_path / "ref" / "checkpoint-2"))
    run(MaskSubTrainer, head, "ga1", tmp_path / "got", callbacks=[StopAt(2)])
    got = run(MaskSubTrainer, head, "ga1", tmp_path / "got", resume=str(tmp_path / "got" / "checkpoint-2"))
    whole = run(MaskSubTrainer, head, "ga1", tmp_path / "whole")
    a, b, c = state(ref), state(got), state(whole)
    assert all(torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("head,combo", list(cases()))
def test_mask_mode_trains_and_logs_both_branches_in_every_combination(head, combo, tmp_path):
    t = run(MaskSubTrainer, head, combo, tmp_path / "mask", mode="mask")
    before = {k: v for k, v in model(head).state_dict().items()}
    after = state(t)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    main, sub, total = losses(t, "loss_main"), losses(t, "loss_sub"), losses(t, "loss")
    assert len(main) == len(sub) == len(total) == 4
    assert all(x == x and x >= 0 for x in main + sub) and all(x > 0 for x in main)
    if head != "regression":  # a regression head's masked prediction differs by < 1e-6 at first
        assert all(x > 0 for x in sub)


def test_compute_loss_func_with_accumulation_is_not_divided_twice(tmp_path):
    """The Trainer's rule: a compute_loss_func loss is already scaled for accumulation."""
    ref = run(Trainer, "single", "lossfunc_ga2", tmp_path / "ref", max_steps=1)
    got = run(MaskSubTrainer, "single", "lossfunc_ga2", tmp_path / "got", max_steps=1)
    start = model("single").state_dict()
    moved = [sum(float((t.model.state_dict()[k] - start[k]).abs().sum()) for k in start) for t in (ref, got)]
    assert moved[1] == pytest.approx(moved[0], rel=1e-6)


@pytest.mark.parametrize("combo", ["smooth", "lossfunc"])
def test_token_classification_mask_mode_with_popped_labels(combo, tmp_path):
    """Label smoothing and compute_loss_func take the labels out of the batch: the sub-branch's
    per-token loss still finds them."""
    t = run(MaskSubTrainer, "token", combo, tmp_path / "o", mode="mask", max_steps=2)
    assert len(losses(t, "loss_sub")) == 2 and all(x > 0 for x in losses(t, "loss_sub"))
