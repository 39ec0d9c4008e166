"""``masksub glue``: finetune a Hugging Face model on a GLUE task, baseline or MaskSub.

Defaults are the paper's BERT finetuning (Table 11): lr 2e-5, batch 32, 3 epochs, linear
decay after a 10% warm-up, weight decay 0.01, 128 tokens, MaskSub with 15% [MASK] on the
real tokens. Data: ``datasets.load_dataset("glue", task)`` when online, or local files
(``--data-dir`` with ``train.*`` and ``validation.*`` / ``dev.*`` as csv, tsv, json(l) or
parquet, columns named as in the hub set: e.g. ``sentence,label`` for SST-2; or GLUE's original
TSV files as unzipped, e.g. MRPC's ``Quality  #1 ID  #2 ID  #1 String  #2 String``). MNLI is
evaluated on matched and mismatched (``dev_matched`` / ``dev_mismatched``), as the paper reports.
The model is evaluated after every epoch and the best one (first metric of the first set) is kept.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..branches import MODES
from ..errors import MaskSubError
from . import glue_metrics
from .files import check_utf8


@dataclass(frozen=True)
class GlueTask:
    text: tuple[str, str | None]
    num_labels: int
    metrics: tuple[str, ...]
    #: evaluation sets: (name in the results, hub split, local file stems)
    evals: tuple[tuple[str, str, tuple[str, ...]], ...] = (("validation", "validation", ("validation", "dev")),)


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence", None), 2, ("matthews",)),
    "sst2": GlueTask(("sentence", None), 2, ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": GlueTask(("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), (  # the paper's table: m / mm
        ("m", "validation_matched", ("validation_matched", "dev_matched")),
        ("mm", "validation_mismatched", ("validation_mismatched", "dev_mismatched")))),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
}
# The original GLUE TSV files (gluebenchmark.com zips; MRPC from SentEval): column of each hub field and
# the label names in the hub's class order. Source: huggingface/datasets, datasets/glue/glue.py (the hub set's
# builder: text_features, label_column, label_classes; CoLA's train/dev files have no header: row[3], row[1]).
ORIGINAL: dict[str, tuple[dict[str, str], str, tuple[str, ...]]] = {
    "cola": ({"sentence": "3"}, "1", ("unacceptable", "acceptable")),
    "sst2": ({"sentence": "sentence"}, "label", ("negative", "positive")),
    "mrpc": ({"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality", ("not_equivalent", "equivalent")),
    "qqp": ({"question1": "question1", "question2": "question2"}, "is_duplicate", ("not_duplicate", "duplicate")),
    "stsb": ({"sentence1": "sentence1", "sentence2": "sentence2"}, "score", ()),
    "mnli": ({"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label", ("entailment", "neutral", "contradiction")),
    "qnli": ({"question": "question", "sentence": "sentence"}, "label", ("entailment", "not_entailment")),
    "rte": ({"sentence1": "sentence1", "sentence2": "sentence2"}, "label", ("entailment", "not_entailment")),
    "wnli": ({"sentence1": "sentence1", "sentence2": "sentence2"}, "label", ("not_entailment", "entailment")),
}
SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="GLUE task")
    p.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    p.add_argument("--sub", default="mask", choices=("none", *MODES),
                   help="sub-branch: none (baseline), mask (MaskSub, 15%% [MASK]), dropout, droppath")
    p.add_argument("--ratio", type=float, default=None,
                   help="mask ratio / p_sub / drop-path increase (default: paper's 0.15 / 0.2 / 0.1)")
    p.add_argument("--data-dir", default=None,
                   help="local files train.* and validation.* (or dev.*); default: the hub's glue set")
    p.add_argument("--hub-dataset", default="glue", help="hub data set name used without --data-dir")
    p.add_argument("--out", default=None, help="output directory (default runs/glue-TASK-SUB)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--log-every", type=int, default=50, help="log losses every N optimizer steps")
    p.add_argument("--save-model", action="store_true", help="save the finetuned model to OUT/model")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the last OUT/checkpoint-* (the same command plus --resume)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")


def _find(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in SUFFIXES:
            f = data_dir / f"{name}{suffix}"
            if f.is_file():
                return f
    return None


def load_data(task: str, data_dir: str | None, hub_dataset: str = "glue") -> Any:
    """``DatasetDict`` with ``train`` and one split per evaluation set (``validation``; MNLI ``m``
    and ``mm``), from local files or the hub."""
    import datasets

    spec = TASKS[task]
    if data_dir is None:
        try:
            ds = datasets.load_dataset(hub_dataset, task)
        except Exception as e:  # offline, or no such set: say how to give files instead
            raise MaskSubError(
                f"could not load {hub_dataset!r}/{task} from the hub ({type(e).__name__}: {e}); offline, pass "
                "--data-dir DIR with train.csv and validation.csv (or .tsv/.json/.jsonl/.parquet, or GLUE's "
                "original train.tsv / dev.tsv)"
            ) from e
        return datasets.DatasetDict(train=ds["train"], **{name: ds[split] for name, split, _ in spec.evals})
    d = Path(data_dir)
    if not d.is_dir():
        raise MaskSubError(f"--data-dir {data_dir} is not a directory")
    files = {"train": _find(d, ("train",))}
    for name, _, stems in spec.evals:
        files[name] = _find(d, stems)
    missing = [f"{'/'.join(s + '.*' for s in stems)}" for name, _, stems in spec.evals if files[name] is None]
    if files["train"] is None:
        missing.insert(0, "train.*")
    if missing:
        raise MaskSubError(f"{data_dir} has no {' or '.join(missing)} file; give {', '.join('NAME' + s for s in SUFFIXES)}")
    for f in files.values():
        if f.suffix != ".parquet":
            check_utf8(f)
    kinds = {SUFFIXES[f.suffix] for f in files.values()}
    if len(kinds) != 1:
        raise MaskSubError(f"train and evaluation files must have the same format, got {[f.name for f in files.values()]}")
    if all(f.suffix == ".tsv" for f in files.values()):
        return datasets.DatasetDict({k: datasets.Dataset.from_list(read_tsv(task, f)) for k, f in files.items()})
    return datasets.load_dataset(kinds.pop(), data_files={k: str(f) for k, f in files.items()})


def read_tsv(task: str, path: Path) -> list[dict[str, Any]]:
    """Rows of a GLUE TSV: columns named as the hub set, or GLUE's original files (MRPC ``#1 String``,
    MNLI ``gold_label`` with label names, CoLA without header), labels mapped to the hub's ids."""
    import csv

    spec = TASKS[task]
    fields, label_col, classes = ORIGINAL[task]
    need = [c for c in (*spec.text, "label") if c]
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise MaskSubError(f"{path} is empty")
    head = rows[0]
    if all(c in head for c in need):  # already the hub's column names
        cols, body = {c: head.index(c) for c in need}, rows[1:]
    elif all(c in head for c in (*fields.values(), label_col)):  # GLUE's original header
        cols = {k: head.index(v) for k, v in fields.items()} | {"label": head.index(label_col)}
        body = rows[1:]
    elif task == "cola" and len(head) >= 4 and head[1] in ("0", "1"):  # CoLA's headerless files
        cols, body = {k: int(v) for k, v in fields.items()} | {"label": int(label_col)}, rows
    else:
        raise MaskSubError(
            f"{path}: the header {head} has neither the columns {need} nor GLUE's original "
            f"{[*fields.values(), label_col]} for {task}"
        )
    out = []
    for i, row in enumerate(body):
        try:
            rec = {k: row[j] for k, j in cols.items()}
            y = rec["label"]
            rec["label"] = float(y) if spec.num_labels == 1 else (classes.index(y) if y in classes else int(y))
        except (IndexError, ValueError) as e:
            raise MaskSubError(f"{path}, row {i + 2}: cannot read it ({e}); labels of {task}: {classes or 'numbers'}") from e
        out.append(rec)
    return out


def eval_names(task: str) -> list[str]:
    return [name for name, _, _ in TASKS[task].evals]


def check_columns(ds: Any, task: str) -> None:
    spec = TASKS[task]
    need = [c for c in (*spec.text, "label") if c]
    for split in ("train", *eval_names(task)):
        cols = ds[split].column_names
        missing = [c for c in need if c not in cols]
        if missing:
            raise MaskSubError(
                f"the {split} data of {task} lacks column(s) {missing} (has {cols}); {task} needs {need}"
            )


def encode(ds: Any, tok: Any, task: str, max_length: int) -> Any:
    spec = TASKS[task]
    a, b = spec.text
    regression = spec.num_labels == 1

    def fn(batch: dict[str, list]) -> dict[str, list]:
        enc = tok(batch[a], batch[b] if b else None, truncation=True, max_length=max_length)
        enc["labels"] = [float(y) if regression else int(y) for y in batch["label"]]
        return dict(enc)

    return ds.map(fn, batched=True, remove_columns=ds["train"].column_names, desc="tokenize")


def metrics_fn(task: str):
    spec = TASKS[task]

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        pred = logits.reshape(-1) if spec.num_labels == 1 else logits.argmax(-1)
        return glue_metrics.compute(spec.metrics, pred, labels)

    return compute


def last_checkpoint(out: Path) -> Path | None:
    """The Trainer's newest ``checkpoint-STEP`` folder in ``out``, or None."""
    found = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return max(found)[1] if found else None


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
        set_seed,
    )

    from .hf import MaskSubTrainer

    spec = TASKS[args.task]
    if args.sub == "none" and args.ratio is not None:
        raise MaskSubError("--ratio has no effect with --sub none; drop it or pick --sub mask")
    out = Path(args.out or f"runs/glue-{args.task}-{args.sub}")
    last = last_checkpoint(out)
    if args.resume and last is None:
        raise MaskSubError(f"--resume: {out} holds no checkpoint-* to continue from; run without --resume")
    if not args.resume and last is not None:
        raise MaskSubError(f"{out} already holds {last.name} of an earlier run: continue it with --resume, "
                           "or give another --out")
    ds = load_data(args.task, args.data_dir, args.hub_dataset)
    check_columns(ds, args.task)
    if args.max_train_samples:
        ds["train"] = ds["train"].select(range(min(args.max_train_samples, len(ds["train"]))))
    evals = eval_names(args.task)
    if args.max_eval_samples:
        for name in evals:
            ds[name] = ds[name].select(range(min(args.max_eval_samples, len(ds[name]))))
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        set_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=spec.num_labels)
    except OSError as e:
        raise MaskSubError(f"cannot load model {args.model!r} ({e}); offline, give a local model directory") from e
    data = encode(ds, tok, args.task, args.max_length)
    # one evaluation set: metric names as they are; MNLI: m_accuracy, mm_accuracy (the Trainer's dict prefixes)
    eval_data = data[evals[0]] if len(evals) == 1 else {name: data[name] for name in evals}
    prefix = "" if len(evals) == 1 else f"{evals[0]}_"
    targs = TrainingArguments(
        output_dir=str(out), learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(64, args.batch_size), num_train_epochs=args.epochs,
        max_steps=args.max_steps, warmup_steps=args.warmup_ratio, weight_decay=args.weight_decay,
        lr_scheduler_type="linear", gradient_accumulation_steps=args.grad_accum, seed=args.seed,
        bf16=args.precision == "bf16", fp16=args.precision == "fp16", use_cpu=args.cpu,
        logging_steps=args.log_every, report_to=[], disable_tqdm=True,
        # evaluate after every epoch and keep the best (the first metric of the first evaluation set)
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model=prefix + spec.metrics[0], greater_is_better=True,
    )
    trainer = MaskSubTrainer(
        model=model, args=targs, train_dataset=data["train"], eval_dataset=eval_data,
        processing_class=tok, data_collator=DataCollatorWithPadding(tok),
        compute_metrics=metrics_fn(args.task), masksub_mode=args.sub, masksub_ratio=args.ratio,
    )
    train_out = trainer.train(resume_from_checkpoint=str(last) if args.resume else None)
    keep = {f"{name}_{m}" for name in evals for m in spec.metrics} if prefix else set(spec.metrics)
    epochs = [{k.removeprefix("eval_"): v for k, v in h.items() if k.removeprefix("eval_") in keep or k == "epoch"}
              for h in trainer.state.log_history if any(k.startswith("eval_") for k in h) and "epoch" in h]
    metrics = trainer.evaluate()  # the kept (best) model
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "task": args.task, "model": args.model, "sub": args.sub, "ratio": trainer.masksub_ratio or None,
        "seed": args.seed, "steps": trainer.state.global_step, "train_loss": train_out.training_loss,
        "metrics": {k.removeprefix("eval_"): v for k, v in metrics.items() if k.removeprefix("eval_") in keep},
        "best_step": int(trainer.state.best_global_step or trainer.state.global_step),
        "per_epoch": [e for e in epochs if len(e) > 1],
        "log_history": trainer.state.log_history,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    # the checkpoints stay (the best and the last, save_total_limit=1): a longer run can continue
    if args.save_model:
        trainer.save_model(str(out / "model"))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    print(f"glue {args.task} sub={args.sub}: {shown} ({result['steps']} steps) -> {out / 'metrics.json'}")
    return 0
