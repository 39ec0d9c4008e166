"""The trainer's Figure 2 analysis measures what the paper plots, for every family.

Figure 2d compares the main-branch gradient of MaskSub with the gradient "of other training" on
one axis: each curve is the norm of the gradient of that branch's own loss, unweighted, over
every micro-batch. A reference computed by hand on a copy of the same weights checks it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from masksub.train import config as C
from masksub.train.engine import Trainer

TINY = dict(model="vit_tiny_patch16_224", model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
            img_size=32, num_classes=5, data="synthetic", synthetic_size=16, synthetic_val_size=4, batch_size=4,
            epochs=1, aug="none", amp="none", workers=0, progress=False, tensorboard=False, analysis=True,
            grad_norm_every=1, drop_path=0.0, clip_grad=None, seed=0)


def _reference_norm(model: torch.nn.Module, batches: list, criterion) -> float:
    """Mean over the micro-batches of ||grad criterion(model(x), y)||: Eq. (1)'s own gradient."""
    norms = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    return float(torch.stack(norms).mean())


@pytest.mark.parametrize("accum", [1, 2])
def test_figure2_main_gradient_norm_is_on_the_baselines_scale(tmp_path: Path, accum: int) -> None:
    """At identical weights and batches, the baseline's and MaskSub-main's norms both equal the
    gradient norm of Eq. (1) itself (not x 0.5, not / accum_steps, not the last micro-batch only)."""
    got = {}
    for sub in ("none", "mask"):
        t = Trainer(C.load(None, TINY | {"sub": sub, "accum_steps": accum, "output": str(tmp_path), "run_name": sub}))
        it = t.train_data.iterate(0, 0)
        batches = [next(it) for _ in range(accum)]
        ref = _reference_norm(copy.deepcopy(t.model_raw), batches, t.criterion)
        t._it = iter(batches)
        res = t._update()
        assert res is not None
        got[sub] = float(res.grad_norm_main)
        assert got[sub] == pytest.approx(ref, rel=1e-4), (sub, accum)
        if sub == "mask":
            assert res.grad_norm_sub is not None and float(res.grad_norm_sub) > 0  # the sub curve, |grad Eq. (3)|
        t.log.close()
    assert got["none"] == pytest.approx(got["mask"], rel=1e-4)


HIERA = dict(model="hiera_tiny_224", model_kwargs={"embed_dim": 16, "num_heads": 1, "stages": [1, 1, 1, 1]},
             img_size=64, num_classes=4, data="synthetic", synthetic_size=8, synthetic_val_size=4, batch_size=4,
             epochs=1, aug="none", amp="none", workers=0, progress=False, tensorboard=False, grad_norm_every=1,
             analysis_subset=4, source="test")


@pytest.mark.slow
def test_analysis_runs_on_hiera_and_keeps_the_epoch(tmp_path: Path) -> None:
    """Hiera masks only in training mode: the eval-mode loss analysis used to crash at the end of
    epoch 1, losing it. Now the epoch completes with both losses, and last.pt is written."""
    from masksub.cli import main

    recipe = tmp_path / "hiera.yaml"
    recipe.write_text(yaml.safe_dump(HIERA))
    assert main(["train", "--recipe", str(recipe), "--analysis", "--output", str(tmp_path), "--run-name", "h"]) == 0
    run = tmp_path / "h"
    ep = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in s][-1]
    assert ep["epoch"] == 1 and (run / "last.pt").is_file()
    assert ep["train_loss_masked"] != ep["train_loss_unmasked"]  # the masked forward did mask
    assert ep["grad_norm_main"] > 0 and ep["grad_norm_sub"] > 0


@pytest.mark.slow
def test_analysis_a_family_cannot_run_is_refused_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    """Were a family's masked forward impossible in eval(), the run stops before any step (exit 2,
    one line), not after an epoch of training."""
    from masksub.branches.vit import HieraTokenRemoval
    from masksub.cli import main

    monkeypatch.setattr(HieraTokenRemoval, "masks_in_training_only", False)
    recipe = tmp_path / "hiera.yaml"
    recipe.write_text(yaml.safe_dump(HIERA))
    assert main(["train", "--recipe", str(recipe), "--analysis", "--output", str(tmp_path), "--run-name", "h"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "analysis" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "h" / "last.pt").exists()


def _fake_run(root: Path, name: str, sub: str, masking_only: bool = False) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"sub": sub, "masking_only": masking_only, "seed": 0}))
    recs = [{"kind": "epoch", "epoch": e, "top1": 50.0 + e, "grad_norm_main": 1.0 + e}
            | ({"grad_norm_sub": 0.2 * e} if sub != "none" and not masking_only else {}) for e in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_plot_labels_each_gradient_curve_with_what_it_is(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.figure

    from masksub.compare.plot import plot_runs

    legends: dict[str, list[str]] = {}
    real = matplotlib.figure.Figure.savefig

    def spy(self, path, *a, **k):
        legends[Path(path).name] = [t.get_text() for t in self.axes[0].get_legend().get_texts()]
        legends[Path(path).name + ":y"] = [self.axes[0].get_ylabel()]
        return real(self, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    runs = [_fake_run(tmp_path, "baseline", "none"), _fake_run(tmp_path, "masking", "mask", True),
            _fake_run(tmp_path, "masksub", "mask"), _fake_run(tmp_path, "pathsub", "droppath")]
    plot_runs(runs, tmp_path / "out")
    assert legends["grad_norm.png"] == [
        "baseline: |grad Eq. (1)|, standard", "masking: |grad Eq. (2)|, masking",
        "masksub: |grad Eq. (1)|, MaskSub main", "masksub: |grad Eq. (3)|, MaskSub sub",
        "pathsub: |grad Eq. (1)|, PathSub main", "pathsub: |grad Eq. (3)|, PathSub sub"]
    assert "unweighted" in legends["grad_norm.png:y"][0]
