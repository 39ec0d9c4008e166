"""`masksub compare` end to end on a CPU-sized Fashion-MNIST: runs, table, plots, raw JSON."""

import csv
import json
from pathlib import Path

import pytest

from masksub.cli import main
from masksub.train.data import FMNIST_DIRS, FMNIST_FILES

TINY = ["--epochs", "1", "--set", "subset=256", "--set", "val_subset=128", "--set", "batch_size=64",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=48", "--set", "analysis_subset=64",
        "--no-progress"]


def _have_fmnist() -> bool:
    img, lab = FMNIST_FILES["train"]
    return any((Path(d) / img).is_file() and (Path(d) / lab).is_file() for d in FMNIST_DIRS)


@pytest.mark.skipif(not _have_fmnist(), reason="dataset-fashion-mnist not installed")
def test_compare_quick_writes_table_plots_and_json(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    rc = main(["compare", "--recipe", "fashion-mnist", "--quick", "--settings",
               "baseline,masking,masksub,samebudget", "--seeds", "0", "--out", str(out), *TINY])
    assert rc == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    per_seed = [r for r in rows if r["seed"] != "mean"]
    assert [r["setting"] for r in per_seed] == ["baseline", "masking", "masksub", "samebudget"]
    for r in per_seed:
        assert 0.0 <= float(r["final_top1"]) <= 100.0
        assert float(r["time_s"]) > 0
    base = next(r for r in per_seed if r["setting"] == "baseline")
    assert float(base["cost_vs_baseline"]) == pytest.approx(1.0)
    # the same-budget row gets ceil(epochs x measured MaskSub cost) epochs, at least the baseline's
    masksub = next(r for r in per_seed if r["setting"] == "masksub")
    same = next(r for r in per_seed if r["setting"] == "samebudget")
    import math

    assert int(same["epochs"]) == max(1, math.ceil(float(masksub["cost_vs_baseline"]) - 1e-9))
    for png in ("accuracy.png", "train_loss_unmasked.png", "train_loss_masked.png", "grad_norm.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    res = json.loads((out / "results.json").read_text())
    assert res["settings"] == ["baseline", "masking", "masksub", "samebudget"]
    ms_run = next(r for r in res["runs"] if r["setting"] == "masksub")
    ep = ms_run["epochs"][-1]
    assert ep["train_loss_unmasked"] > 0 and ep["train_loss_masked"] > 0
    assert ep["grad_norm_main"] > 0 and ep["grad_norm_sub"] > 0
    for setting in ("baseline", "masking"):  # one branch each: its norm, and no sub norm
        ep = next(r for r in res["runs"] if r["setting"] == setting)["epochs"][-1]
        assert ep["grad_norm_main"] > 0 and "grad_norm_sub" not in ep
    assert "| masksub | 0 |" in (out / "results.md").read_text()


def test_compare_rejects_unknown_setting_before_training(tmp_path: Path, capsys) -> None:
    rc = main(["compare", "--recipe", "fashion-mnist", "--settings", "baseline,masksubb",
               "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "masksubb" in capsys.readouterr().err
    assert not (tmp_path / "x" / "baseline-seed0").exists()


def test_plot_rejects_a_folder_that_is_no_run(tmp_path: Path, capsys) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
