"""``masksub glue``: finetune a Hugging Face model on a GLUE task, baseline or MaskSub.

Defaults are the paper's BERT finetuning (Table 11): lr 2e-5, batch 32, 3 epochs, linear
decay after a 10% warm-up, weight decay 0.01, 128 tokens, MaskSub with 15% [MASK] on the
real tokens. Data: ``datasets.load_dataset("glue", task)`` when online, or local files
(``--data-dir`` with ``train.*`` and ``validation.*`` / ``dev.*`` as csv, tsv, json(l) or
parquet, columns named as in the hub set: e.g. ``sentence,label`` for SST-2).
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


@dataclass(frozen=True)
class GlueTask:
    text: tuple[str, str | None]
    num_labels: int
    metrics: tuple[str, ...]
    eval_split: str = "validation"


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence", None), 2, ("matthews",)),
    "sst2": GlueTask(("sentence", None), 2, ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": GlueTask(("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
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
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")


def _find(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in SUFFIXES:
            f = data_dir / f"{name}{suffix}"
            if f.is_file():
                return f
    return None


def load_data(task: str, data_dir: str | None, hub_dataset: str = "glue") -> Any:
    """``DatasetDict`` with ``train`` and ``validation`` splits, from local files or the hub."""
    import datasets

    spec = TASKS[task]
    if data_dir is None:
        try:
            ds = datasets.load_dataset(hub_dataset, task)
        except Exception as e:  # offline, or no such set: say how to give files instead
            raise MaskSubError(
                f"could not load {hub_dataset!r}/{task} from the hub ({type(e).__name__}: {e}); offline, pass "
                "--data-dir DIR with train.csv and validation.csv (or .tsv/.json/.jsonl/.parquet)"
            ) from e
        return datasets.DatasetDict(train=ds["train"], validation=ds[spec.eval_split])
    d = Path(data_dir)
    if not d.is_dir():
        raise MaskSubError(f"--data-dir {data_dir} is not a directory")
    train = _find(d, ("train",))
    val = _find(d, (spec.eval_split, "validation", "dev", "dev_matched"))
    if train is None or val is None:
        missing = "train.*" if train is None else "validation.* (or dev.*)"
        raise MaskSubError(f"{data_dir} has no {missing} file; give {', '.join('NAME' + s for s in SUFFIXES)}")
    if SUFFIXES[train.suffix] != SUFFIXES[val.suffix]:
        raise MaskSubError(f"train and validation files must have the same format, got {train.name} and {val.name}")
    builder = SUFFIXES[train.suffix]
    kwargs = {"delimiter": "\t", "quoting": 3} if train.suffix == ".tsv" else {}
    return datasets.load_dataset(builder, data_files={"train": str(train), "validation": str(val)}, **kwargs)


def check_columns(ds: Any, task: str) -> None:
    spec = TASKS[task]
    need = [c for c in (*spec.text, "label") if c]
    for split in ("train", "validation"):
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
    ds = load_data(args.task, args.data_dir, args.hub_dataset)
    check_columns(ds, args.task)
    if args.max_train_samples:
        ds["train"] = ds["train"].select(range(min(args.max_train_samples, len(ds["train"]))))
    if args.max_eval_samples:
        ds["validation"] = ds["validation"].select(range(min(args.max_eval_samples, len(ds["validation"]))))
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        set_seed(args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=spec.num_labels)
    except OSError as e:
        raise MaskSubError(f"cannot load model {args.model!r} ({e}); offline, give a local model directory") from e
    data = encode(ds, tok, args.task, args.max_length)
    targs = TrainingArguments(
        output_dir=str(out), learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(64, args.batch_size), num_train_epochs=args.epochs,
        max_steps=args.max_steps, warmup_steps=args.warmup_ratio, weight_decay=args.weight_decay,
        lr_scheduler_type="linear", gradient_accumulation_steps=args.grad_accum, seed=args.seed,
        bf16=args.precision == "bf16", fp16=args.precision == "fp16", use_cpu=args.cpu,
        logging_steps=args.log_every, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
    )
    trainer = MaskSubTrainer(
        model=model, args=targs, train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=tok, data_collator=DataCollatorWithPadding(tok),
        compute_metrics=metrics_fn(args.task), masksub_mode=args.sub, masksub_ratio=args.ratio,
    )
    train_out = trainer.train()
    metrics = trainer.evaluate()
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "task": args.task, "model": args.model, "sub": args.sub, "ratio": trainer.masksub_ratio or None,
        "seed": args.seed, "steps": trainer.state.global_step, "train_loss": train_out.training_loss,
        "metrics": {k.removeprefix("eval_"): v for k, v in metrics.items()
                    if k.removeprefix("eval_") in spec.metrics},
        "log_history": trainer.state.log_history,
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    if args.save_model:
        trainer.save_model(str(out / "model"))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    print(f"glue {args.task} sub={args.sub}: {shown} ({result['steps']} steps) -> {out / 'metrics.json'}")
    return 0
