"""Each sub-branch mode runs at its own strength: a recipe's mask ratio (0.5) never becomes
DropSub's dropout p or PathSub's drop-path increase (the paper's Table 13: 0.5, 0.2, +0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from masksub.cli import main

# fashion-mnist-quick (ratio: 0.5) on synthetic images: seconds, no dataset needed
TINY = ["--recipe", "fashion-mnist-quick", "--data", "synthetic", "--epochs", "1", "--no-progress",
        "--set", "synthetic_size=32", "--set", "synthetic_val_size=16", "--set", "batch_size=16",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=24", "--set", "workers=0",
        "--set", "tensorboard=false", "--set", "drop_path=0.05", "--set", "drop_path_uniform=true"]


class _Rates:
    """The dropout p and drop-path rates the model's own modules ran at in training forwards."""

    def __init__(self) -> None:
        self.dropout: set[float] = set()
        self.droppath: set[float] = set()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not module.training:
            return
        if isinstance(module, nn.Dropout) and module.p > 0:
            self.dropout.add(round(module.p, 6))
        if isinstance(module, DropPath) and module.drop_prob > 0:
            self.droppath.add(round(module.drop_prob, 6))


@pytest.fixture
def rates():
    seen = _Rates()
    handle = nn.modules.module.register_module_forward_pre_hook(seen)
    yield seen
    handle.remove()


@pytest.mark.parametrize("sub,flag,expect", [
    ("dropout", [], {"dropout": {0.2}, "droppath": {0.05}}),
    ("droppath", [], {"dropout": set(), "droppath": {0.05, 0.15}}),
    ("dropout", ["--dropsub-p", "0.3"], {"dropout": {0.3}, "droppath": {0.05}}),
    ("droppath", ["--set", "pathsub_delta=0.2"], {"dropout": set(), "droppath": {0.05, 0.25}}),
])
def test_train_runs_each_mode_at_its_own_strength(tmp_path: Path, rates: _Rates, sub, flag, expect) -> None:
    rc = main(["train", *TINY, "--sub", sub, *flag, "--output", str(tmp_path), "--run-name", "r"])
    assert rc == 0
    assert {"dropout": rates.dropout, "droppath": rates.droppath} == expect
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["ratio"] == pytest.approx(max(expect[sub]) - (0.05 if sub == "droppath" else 0))


def test_one_compare_call_runs_masksub_dropsub_pathsub_at_the_paper_values(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    rc = main(["compare", *TINY, "--settings", "masksub,dropsub,pathsub", "--seeds", "0", "--no-analysis",
               "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["setting"]: r["summary"]["ratio"] for r in runs} == pytest.approx(
        {"masksub": 0.5, "dropsub": 0.2, "pathsub": 0.1})
    err = capsys.readouterr().err
    assert "sub=dropout ratio=0.2" in err and "sub=droppath ratio=0.1" in err


@pytest.mark.parametrize("recipe,sub,line", [
    ("deit3-vit-b-400", "droppath", "every drop-path + 0.1 in the sub forward"),
    ("deit3-vit-b-400", "dropout", "dropout p 0.2 in the sub forward"),
    ("deit3-vit-b-400", "mask", "mask ratio 0.5"),
])
def test_show_prints_the_strength_that_will_run(capsys, recipe, sub, line) -> None:
    assert main(["train", "--recipe", recipe, "--sub", sub, "--show"]) == 0
    assert line in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--sub", "dropout", "--ratio", "0.3"], "--dropsub-p 0.3"),
    (["--sub", "droppath", "--ratio", "0.3"], "--pathsub-delta 0.3"),
    (["--sub", "dropout", "--dropsub-p", "1.5"], "dropsub_p"),
    (["--sub", "droppath", "--set", "pathsub_delta=-0.1"], "pathsub_delta"),
])
def test_bad_strength_is_refused_in_one_line(tmp_path: Path, capsys, args, needle) -> None:
    rc = main(["train", *TINY, *args, "--output", str(tmp_path), "--run-name", "r"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_run_saved_before_the_per_mode_keys_resumes_at_its_own_strength() -> None:
    from masksub.train import config as C

    old = {**C.Config().to_dict(), "sub": "dropout", "ratio": 0.35}
    del old["dropsub_p"], old["pathsub_delta"]
    assert C.sub_strength(C.from_dict(old)) == pytest.approx(0.35)
    torch.manual_seed(0)
