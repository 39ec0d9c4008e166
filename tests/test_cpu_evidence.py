"""The CPU-evidence recipes (``fmnist-cpu-*``), their masking unit on 28 px images, and the
script that turns the comparisons into the README's table and plot."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
from pathlib import Path

import pytest
import torch

from masksub.cli import main
from masksub.train import config as C
from masksub.train.data import FMNIST_DIRS, FMNIST_FILES

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"fmnist-cpu-vit": ("vit", 7), "fmnist-cpu-swin": ("swin", 4),
           "fmnist-cpu-convnext": ("stem", 4), "fmnist-cpu-resnet": ("pixel", 4)}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _have_fmnist() -> bool:
    img, lab = FMNIST_FILES["train"]
    return any((Path(d) / img).is_file() and (Path(d) / lab).is_file() for d in FMNIST_DIRS)


def test_every_cpu_recipe_is_there_with_its_purpose() -> None:
    assert set(RECIPES) <= set(C.recipe_names())
    for name in RECIPES:
        text = C.find_recipe(name).read_text()
        assert text.startswith("# CPU evidence") and "Size:" in text and "Length:" in text, name


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_masking_unit_is_scaled_to_28px(name: str) -> None:
    """Half the image hidden in units of 4 px (7 px for the ViT's tokens), not one 32 px square
    that is the whole Fashion-MNIST image: seen on the input of the model's own modules."""
    family, unit = RECIPES[name]
    cfg = C.load(name, {"data": "synthetic"})
    x = torch.randn(6, 1, 28, 28)
    hidden, got = _script("mask_grid").hidden_map(cfg, x)
    assert got == family
    assert hidden.shape == (6, 1, 28, 28)
    g = 28 // unit
    cells = hidden[:, 0].reshape(6, g, unit, g, unit)
    # constant on each unit square ...
    assert torch.equal(cells.amax((2, 4)), cells.amin((2, 4)))
    # ... and about half of the g x g units hidden in every image
    per_image = cells.amax((2, 4)).flatten(1).sum(1)
    assert per_image.tolist() == [round(0.5 * g * g)] * 6 or per_image.tolist() == [g * g - int(g * g * 0.5)] * 6


@pytest.mark.skipif(not _have_fmnist(), reason="dataset-fashion-mnist not installed")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cpu_recipe_trains_a_few_steps(name: str, tmp_path: Path) -> None:
    rc = main(["train", "--recipe", name, "--max-steps", "3", "--epochs", "1", "--analysis", "--no-progress",
               "--set", "subset=300", "--set", "val_subset=200", "--set", "analysis_subset=100",
               "--output", str(tmp_path), "--run-name", "r"])
    assert rc == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["sub"] == "mask" and summary["ratio"] == 0.5
    assert 0 <= summary["top1"] <= 100


def _fake_family(root: Path, name: str, recipe: str, settings: list[str], tops: dict, times: dict) -> None:
    d = root / name
    d.mkdir(parents=True)
    rows = [{"setting": s, "seed": seed, "epochs": 20, "final_top1": tops[s][seed], "best_top1": tops[s][seed],
             "time_s": times[s], "cost_vs_baseline": times[s] / times["baseline"], "complete": "yes"}
            for s in settings for seed in (0, 1, 2)]
    rows.append({**rows[0], "seed": 3, "final_top1": 0.0, "complete": "no"})  # cut short: left out
    runs = [{"setting": s, "seed": seed, "summary": {"ratio": {"baseline": None, "masksub": 0.5, "dropsub": 0.2,
                                                              "pathsub": 0.1}[s]}}
            for s in settings for seed in (0, 1, 2)]
    (d / "results.json").write_text(json.dumps({"recipe": recipe, "settings": settings, "rows": rows, "runs": runs}))


def test_evidence_table_and_plot_from_fake_results(tmp_path: Path) -> None:
    res = tmp_path / "res"
    _fake_family(res, "vit", "fmnist-cpu-vit", ["baseline", "masksub", "dropsub"],
                 {"baseline": [80.0, 81.0, 82.0], "masksub": [81.0, 81.5, 81.0], "dropsub": [80.0, 81.0, 82.5]},
                 {"baseline": 100.0, "masksub": 150.0, "dropsub": 210.0})
    _fake_family(res, "resnet", "fmnist-cpu-resnet", ["baseline", "masksub"],
                 {"baseline": [84.0, 84.2, 84.4], "masksub": [83.0, 84.0, 84.0]}, {"baseline": 50.0, "masksub": 100.0})
    (res / "step_cost.json").write_text(json.dumps({"fmnist-cpu-resnet": {"cost_vs_baseline": {"masksub": 2.07}}}))
    readme = tmp_path / "README.md"
    mod = _script("evidence_table")
    readme.write_text(f"intro\n{mod.START}\nold table\n{mod.END}\noutro\n")
    assert mod.main([str(res), "--readme", str(readme)]) == 0
    md = (res / "table.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| resnet") or ln.startswith("| vit")]
    assert len(lines) == 3  # resnet masksub, vit masksub, vit dropsub
    resnet = lines[0].split(" | ")
    assert resnet[1] == "MaskSub 0.5" and resnet[3] == "0, 1, 2"
    assert resnet[4] == f"84.20 ± {statistics.stdev([84.0, 84.2, 84.4]):.2f}"
    assert resnet[6] == "-1.00 / -0.20 / -0.40" and resnet[7] == "-0.53" and resnet[8] == "2.00x" and resnet[9] == "2.07x |"
    vit_drop = lines[2].split(" | ")
    assert vit_drop[1] == "DropSub p 0.2" and vit_drop[6] == "+0.00 / +0.00 / +0.50" and vit_drop[8] == "2.10x" and vit_drop[9] == "— |"
    assert (res / "gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old table" not in text and lines[0] in text and text.startswith("intro") and text.endswith("outro\n")


def test_evidence_table_refuses_a_folder_without_results(tmp_path: Path) -> None:
    assert _script("evidence_table").main([str(tmp_path)]) == 2


def test_campaign_script_parses_and_is_niced() -> None:
    script = ROOT / "benchmarks" / "cpu_evidence.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "nice -n 15" in text and "OMP_NUM_THREADS=1" in text
    for name in RECIPES:
        assert name in text


def test_evidence_table_reads_a_comparison_cut_short(tmp_path: Path) -> None:
    """No results.json yet: the finished runs count, a run stopped early does not."""
    d = tmp_path / "res" / "swin"
    d.mkdir(parents=True)
    (d / "compare.json").write_text(json.dumps({"recipe": "fmnist-cpu-swin", "settings": ["baseline", "masksub"],
                                                "seeds": [0, 1]}))
    for name, top1, done, ratio in (("baseline-seed0", 80.0, 2, None), ("baseline-seed1", 81.0, 2, None),
                                    ("masksub-seed0", 82.5, 2, 0.5), ("masksub-seed1", 10.0, 1, 0.5)):
        r = d / name
        r.mkdir()
        (r / "config.yaml").write_text("sub: mask\nepochs: 2\n")
        (r / "summary.json").write_text(json.dumps({"top1": top1, "epochs_done": done, "stopped": None, "ratio": ratio}))
        (r / "metrics.jsonl").write_text("".join(json.dumps({"kind": "epoch", "epoch": e + 1, "time_s": 10.0 if
                                                             ratio is None else 15.0}) + "\n" for e in range(done)))
    mod = _script("evidence_table")
    rows = mod.family_rows(d)
    assert len(rows) == 1 and rows[0]["seeds"] == [0] and rows[0]["deltas"] == [2.5]
    assert rows[0]["cost"] == pytest.approx(1.5) and rows[0]["label"] == "MaskSub 0.5"


def test_one_seed_folders_join_their_comparison_row(tmp_path: Path) -> None:
    res = tmp_path / "res"
    tops = {"baseline": [70.0, 71.0, 72.0], "masksub": [71.0, 70.0, 74.0]}
    _fake_family(res, "long", "fmnist-cpu-vit", ["baseline", "masksub"], tops, {"baseline": 10.0, "masksub": 15.0})
    _fake_family(res, "long-seed5", "fmnist-cpu-vit", ["baseline", "masksub"], tops, {"baseline": 10.0, "masksub": 20.0})
    mod = _script("evidence_table")
    rows = mod.merge_seed_folders([r for f in sorted(res.iterdir()) for r in mod.family_rows(f)])
    assert len(rows) == 1 and rows[0]["family"] == "long" and rows[0]["seeds"] == [0, 0, 1, 1, 2, 2]
    assert rows[0]["deltas"] == [1.0, 1.0, -1.0, -1.0, 2.0, 2.0] and rows[0]["cost"] == pytest.approx(1.75)


def test_step_cost_times_each_setting_on_the_recipe_model() -> None:
    cost = _script("step_cost").measure("fmnist-cpu-vit", ["masksub", "pathsub"], steps=1)
    assert set(cost) == {"baseline", "masksub", "pathsub"} and all(v > 0 for v in cost.values())


def _fake_standard_run(root: Path, folder: str, recipe: str, epochs: int, top1: float, *, stopped: str | None = None) -> None:
    d = root / folder
    (d / "baseline-seed0").mkdir(parents=True)
    (d / "compare.json").write_text(json.dumps({"recipe": recipe, "settings": ["baseline"], "seeds": [0]}))
    run = d / "baseline-seed0"
    (run / "config.yaml").write_text(f"sub: none\nepochs: {epochs}   # the length\n")
    done = epochs if stopped is None else epochs // 2
    (run / "summary.json").write_text(json.dumps({"top1": top1, "epochs_done": done, "stopped": stopped,
                                                  "steps": 20 * done}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "epoch", "epoch": e + 1, "loss_main": 1.0 / (e + 1),
                                                           "val_loss": 0.5}) + "\n" for e in range(done)))


def test_lengths_table_marks_the_shortest_length_whose_double_adds_little(tmp_path: Path) -> None:
    """How the lengths were chosen: the standard run at doubling lengths; converged where twice
    the length adds under 0.5 points; a run cut short and a second copy of a length do not count."""
    pilot, older = tmp_path / "pilot", tmp_path / "older"
    _fake_standard_run(pilot, "vit-40ep", "fmnist-cpu-vit", 40, 75.0)
    _fake_standard_run(pilot, "vit-80ep", "fmnist-cpu-vit", 80, 75.3)
    _fake_standard_run(pilot, "vit-160ep", "fmnist-cpu-vit", 160, 75.5)
    _fake_standard_run(pilot, "swin-40ep", "fmnist-cpu-swin", 40, 60.0)
    _fake_standard_run(pilot, "swin-80ep", "fmnist-cpu-swin", 80, 99.0, stopped="signal")  # cut short
    _fake_standard_run(older, "vit", "fmnist-cpu-vit", 20, 70.0)
    _fake_standard_run(older, "vit-again", "fmnist-cpu-vit", 40, 10.0)  # the pilot's 40 epochs come first
    mod = _script("evidence_table")
    start, end = mod.markers("cpu-evidence lengths")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{start}\nold\n{end}\noutro\n")
    assert mod.main(["--lengths", str(pilot), str(older), "--readme", str(readme)]) == 0
    lines = [ln.split(" | ") for ln in (pilot / "lengths.md").read_text().splitlines()[2:]]
    got = {(ln[0].strip("| `"), int(ln[1])): (ln[3], ln[6], ln[7].rstrip(" |")) for ln in lines}
    assert got == {("fmnist-cpu-swin", 40): ("60.00", "—", "—"),
                   ("fmnist-cpu-vit", 20): ("70.00", "+5.00", "no"),
                   ("fmnist-cpu-vit", 40): ("75.00", "+0.30", "**yes: chosen**"),
                   ("fmnist-cpu-vit", 80): ("75.30", "+0.20", "yes"),
                   ("fmnist-cpu-vit", 160): ("75.50", "—", "—")}
    text = readme.read_text()
    assert "old" not in text and "**yes: chosen**" in text and text.endswith("outro\n")
    assert mod.main(["--lengths", str(tmp_path / "nothing")]) == 2


def test_diagnostics_are_the_last_epoch_means_of_complete_runs(tmp_path: Path) -> None:
    """Figure 2's end-of-run quantities per setting: means over the seeds that finished, the
    gradient ratio from the first and last epochs that measured it; a run cut short is left out."""
    d = tmp_path / "res" / "resnet"
    d.mkdir(parents=True)
    (d / "compare.json").write_text(json.dumps({"recipe": "fmnist-cpu-resnet", "settings": ["baseline", "masksub"],
                                                "seeds": [0, 1]}))

    def run(name: str, done: int, unmasked: float, sub: float | None) -> None:
        r = d / name
        r.mkdir()
        (r / "config.yaml").write_text("epochs: 3\n")
        (r / "summary.json").write_text(json.dumps({"top1": 80.0, "epochs_done": done, "stopped": None}))
        lines = [{"kind": "step", "step": 1, "loss_main": 9.0}]
        for e in range(done):
            lines.append({"kind": "epoch", "epoch": e + 1, "train_loss_unmasked": unmasked + (2 - e), "train_loss_masked":
                          2 * unmasked, "val_loss": 0.5, "grad_norm_main": 2.0,
                          "grad_norm_sub": None if sub is None else sub * (e + 1)})
        (r / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    run("baseline-seed0", 3, 0.1, None)
    run("baseline-seed1", 3, 0.3, None)
    run("masksub-seed0", 3, 0.4, 0.2)
    run("masksub-seed1", 2, 5.0, 9.0)  # cut short
    mod = _script("evidence_table")
    rows = {r["setting"]: r for r in mod.diagnostic_rows(d)}
    assert rows["baseline"]["seeds"] == [0, 1] and rows["baseline"]["unmasked"] == pytest.approx(0.2)
    assert rows["baseline"]["ratio_first"] is None and rows["baseline"]["masked"] == pytest.approx(0.4)
    assert rows["masksub"]["seeds"] == [0] and rows["masksub"]["unmasked"] == pytest.approx(0.4)
    assert rows["masksub"]["ratio_first"] == pytest.approx(0.1) and rows["masksub"]["ratio_last"] == pytest.approx(0.3)
    md = mod.diagnostics_markdown(list(rows.values())).splitlines()
    assert md[2] == "| resnet | standard | 2 | 0.200 | 0.400 | 0.500 | — | — |"
    assert md[3] == "| resnet | MaskSub | 1 | 0.400 | 0.800 | 0.500 | 0.10 | 0.30 |"
    readme = tmp_path / "README.md"
    (start, end), (dstart, dend) = mod.markers(), mod.markers("cpu-evidence diagnostics")
    readme.write_text(f"{start}\n{end}\nbetween\n{dstart}\nold\n{dend}\n")
    assert mod.main([str(tmp_path / "res"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and md[3] in text and md[3] in (tmp_path / "res" / "diagnostics.md").read_text()


def test_diagnostics_of_one_seed_folders_join_one_row(tmp_path: Path) -> None:
    res = tmp_path / "res"
    for folder, seed, loss in (("long", 0, 0.5), ("long-seed1", 1, 0.7), ("long-seed2", 2, 1.2)):
        d = res / folder
        d.mkdir(parents=True)
        (d / "compare.json").write_text(json.dumps({"recipe": "fmnist-cpu-resnet", "settings": ["baseline"],
                                                    "seeds": [seed]}))
        r = d / f"baseline-seed{seed}"
        r.mkdir()
        (r / "config.yaml").write_text("epochs: 1\n")
        (r / "summary.json").write_text(json.dumps({"top1": 80.0, "epochs_done": 1, "stopped": None}))
        (r / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "val_loss": loss}) + "\n")
    mod = _script("evidence_table")
    rows = mod.merge_diagnostics([r for f in sorted(res.iterdir()) for r in mod.diagnostic_rows(f)])
    assert len(rows) == 1 and rows[0]["family"] == "long" and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["val"] == pytest.approx(0.8) and rows[0]["unmasked"] is None
