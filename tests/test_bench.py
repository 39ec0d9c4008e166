"""``masksub bench`` end to end on CPU (tiny models) through the real CLI path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from masksub import cli
from masksub.bench.flops import count_flops, mfu, peak_tflops
from masksub.bench.steps import PaperRecipeModel, build_model, mae_random_masking


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main([
        "bench", "--device", "cpu", "--models", "tiny_vit,tiny_resnet", "--modes", "mask,dropout",
        "--orders", "memory,fused", "--variants", "standard,off,paper,masksub,part_main,part_sub,part_opt",
        "--batch", "tiny_vit=4,tiny_resnet=2", "--steps", "2", "--warmup", "1", "--out", str(out),
    ])
    assert rc == 0
    files = sorted(Path(out).glob("*.json"))
    assert len(files) == 1 and "cpu" in files[0].name
    txt = files[0].with_suffix(".txt").read_text()
    assert txt.startswith("masksub bench on cpu")
    return {**json.loads(files[0].read_text()), "_txt": txt}


def _row(res: dict, model: str, label: str) -> dict:
    rows = [r for r in res["rows"] if r["model"] == model and r["label"] == label]
    assert len(rows) == 1, [r["label"] for r in res["rows"] if r["model"] == model]
    return rows[0]


def test_every_setting_measured_with_sane_values(result: dict) -> None:
    labels = {(r["model"], r["label"]) for r in result["rows"]}
    for model in ("tiny_vit", "tiny_resnet"):
        for label in ("standard", "off", "paper mask two-backward", "masksub mask memory", "masksub mask fused",
                      "masksub dropout memory", "masksub dropout fused"):
            assert (model, label) in labels
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["images_per_s"] > 0
        assert r["time_ratio"] is not None and r["time_ratio"] > 0
        assert r["peak_bytes"] is None and r["memory_ratio"] is None  # CPU: no allocator peak
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
        assert r["batch"] == (4 if r["model"] == "tiny_vit" else 2)
    assert _row(result, "tiny_vit", "standard")["time_ratio"] == 1.0
    meta = result["meta"]
    assert meta["steps"] == 2 and meta["warmup"] == 1 and meta["dtype"] == "fp32"
    assert meta["complete"] is True


def test_the_papers_claim_is_printed_beside_the_measured_ratios(result: dict) -> None:
    """The paper: about x1.5 compute for ViT (tokens removed), x2 where the sub forward keeps its
    size (CNN, DropSub), no extra memory in the two-backward order."""
    claim = {(c["model"], c["label"]): c for c in result["paper_claim"]}
    assert claim[("tiny_vit", "masksub mask memory")]["paper_compute"] == 1.5
    assert claim[("tiny_vit", "paper mask two-backward")]["paper_compute"] == 1.5
    assert claim[("tiny_vit", "masksub dropout memory")]["paper_compute"] == 2.0
    assert claim[("tiny_resnet", "masksub mask memory")]["paper_compute"] == 2.0
    assert claim[("tiny_vit", "masksub mask memory")]["paper_memory"] == 1.0
    assert claim[("tiny_vit", "masksub mask fused")]["paper_memory"] is None  # one backward: more memory
    row = _row(result, "tiny_vit", "masksub mask memory")
    assert claim[("tiny_vit", "masksub mask memory")]["time_ratio"] == row["time_ratio"]
    assert len(claim) == 2 * (1 + 2 + 2)  # per model: paper, mask and dropout in both orders
    txt = result["_txt"]
    assert "the paper's claim: about x1.5" in txt and "x2 for CNNs" in txt and "no extra memory" in txt
    line = next(x for x in txt.splitlines() if x.split()[:4] == ["tiny_vit", "masksub", "mask", "memory"]
                and "x1.5" in x)
    assert f"{row['time_ratio']:.3f}" in line


def test_flop_fractions_are_counted(result: dict) -> None:
    vit = _row(result, "tiny_vit", "masksub mask memory")
    assert 0.4 < vit["sub_flop_fraction"] < 0.6  # token removal at 0.5
    paper = _row(result, "tiny_vit", "paper mask two-backward")
    assert paper["sub_flop_fraction"] == pytest.approx(vit["sub_flop_fraction"], rel=0.02)
    # Two branches cost between 1x and 2x the standard step's FLOPs, the sub costing ~half.
    assert 1.4 < vit["flop_ratio"] < 1.65
    for label in ("masksub mask memory", "paper mask two-backward"):
        cnn = _row(result, "tiny_resnet", label)
        assert cnn["sub_flop_fraction"] == pytest.approx(1.0, abs=0.01)  # zeroed pixels cost a full forward
        assert cnn["flop_ratio"] == pytest.approx(2.0, abs=0.02)
    assert _row(result, "tiny_vit", "masksub dropout memory")["sub_flop_fraction"] == pytest.approx(1.0, abs=0.1)
    assert _row(result, "tiny_vit", "off")["flop_ratio"] == pytest.approx(1.0)


def test_breakdown_adds_up(result: dict) -> None:
    parts = {p["model"]: p for p in result["breakdown"]}
    assert set(parts) == {"tiny_vit", "tiny_resnet"}
    p = parts["tiny_vit"]
    assert p["parts_ms"] == pytest.approx(p["main_ms"] + p["sub_ms"] + p["opt_ms"])
    assert 0.4 < p["sub_flop_fraction"] < 0.7  # fwd+bwd of the sub over fwd+bwd of the main
    assert p["opt_ms"] > 0 and p["sub_efficiency"] > 0


def test_bad_batch_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["bench", "--device", "cpu", "--models", "tiny_vit", "--batch", "vit_b=4", "--out", str(tmp_path)])
    assert rc == 2
    assert "--batch names 'vit_b'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_peak_table_and_mfu() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu-2threads") is None
    assert mfu(989e12 * 0.5, 1000.0, 989.0) == pytest.approx(0.5)
    assert mfu(1e12, 10.0, None) is None


def test_mae_masking_and_paper_model() -> None:
    x = torch.randn(3, 10, 4)
    kept, mask = mae_random_masking(x, 0.5)
    assert kept.shape == (3, 5, 4)
    assert mask.sum(1).tolist() == [5.0, 5.0, 5.0]
    for b in range(3):  # the kept tokens are exactly the unmasked ones
        want = x[b][mask[b] == 0]
        assert torch.equal(kept[b].sort(0).values, want.sort(0).values)
    torch.manual_seed(0)
    model = build_model("tiny_vit").eval()
    ref = PaperRecipeModel(model)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ref(img), model(img))
        assert not torch.allclose(ref(img, mask_ratio=0.5), model(img))
        full = count_flops(lambda: ref(img))
        half = count_flops(lambda: ref(img, mask_ratio=0.5))
    assert 0.4 < half / full < 0.6


def test_default_gpu_plan_covers_every_model() -> None:
    from masksub.bench.cli import Setting, default_plan
    from masksub.bench.steps import GPU_MODELS

    plan = set(default_plan(GPU_MODELS, gpu=True))
    for m in ("vit_s", "vit_b", "vit_l", "resnet50", "swin_t"):
        assert {Setting(m, "standard"), Setting(m, "off"), Setting(m, "paper", "mask")} <= plan
        assert {Setting(m, "masksub", "mask", o) for o in ("memory", "fused")} <= plan
    assert Setting("vit_b", "masksub", "mask", "memory", compile=True) in plan
    assert Setting("vit_b", "standard", compile=True) in plan
    for mode in ("dropout", "droppath"):
        assert Setting("vit_b", "masksub", mode, "memory") in plan
    assert not any(s.compile and s.model != "vit_b" for s in plan)


@pytest.mark.parametrize("variant", ["masksub", "paper"])
def test_compiled_sub_branch_is_checked_for_masking(variant: str) -> None:
    from masksub.bench.cli import Setting, _compiled_sub_differs

    torch.manual_seed(0)
    model = build_model("tiny_vit")
    setting = Setting("tiny_vit", variant, "mask", "memory", compile=True)
    assert _compiled_sub_differs(setting, model, torch.randn(2, 3, 32, 32), None) is True


def test_interleaved_run(tmp_path: Path) -> None:
    rc = cli.main(["bench", "--device", "cpu", "--models", "tiny_vit", "--variants", "standard,masksub",
                   "--orders", "memory", "--batch", "2", "--steps", "2", "--warmup", "0", "--interleave",
                   "--stat", "min", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert res["meta"]["interleave"] is True and res["meta"]["stat"] == "min"
    assert [r["label"] for r in res["rows"]] == ["standard", "masksub mask memory"]
    for r in res["rows"]:
        assert r["step_ms"] == r["step_ms_min"] > 0 and r["time_ratio"] > 0


@pytest.mark.parametrize("flags", [["--ratio", "1.5"], ["--drop-path", "-0.1"], ["--steps", "0"]])
def test_bad_numbers_fail_before_any_work(flags: list[str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["bench", "--device", "cpu", "--models", "tiny_vit", *flags, "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "masksub bench: error:" in err and flags[0].lstrip("-").split("-")[0] in err
    assert not list(tmp_path.iterdir())


def test_rows_are_on_disk_as_they_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bench stopped by a time limit after two rows keeps those two rows, with their ratios, in
    a whole JSON file marked incomplete (before, the JSON was written at the end only)."""
    from masksub.bench import cli as bench_cli

    real, done = bench_cli.measure, []

    def measure_then_stop(*a, **k):
        if len(done) == 2:
            raise KeyboardInterrupt  # what a SIGINT at the limit does
        done.append(1)
        return real(*a, **k)

    monkeypatch.setattr(bench_cli, "measure", measure_then_stop)
    rc = cli.main(["bench", "--device", "cpu", "--models", "tiny_vit", "--variants", "standard,masksub,off",
                   "--orders", "memory", "--batch", "2", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert rc == 130
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    res = json.loads(files[0].read_text())
    assert [r["label"] for r in res["rows"]] == ["standard", "masksub mask memory"]
    assert res["meta"]["complete"] is False
    assert res["rows"][1]["time_ratio"] > 0 and res["paper_claim"][0]["paper_compute"] == 1.5
