"""A user's own data and runs: ImageFolder class maps and subsets, symlink loops, compare
--resume after an edited recipe, and exports that load into plain timm. Tiny trees and runs."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from masksub.cli import main
from masksub.train import checkpoint
from masksub.train import config as C
from masksub.train.data import build_data

CPU = torch.device("cpu")


def image_tree(root: Path, splits: dict[str, dict[str, int]], size: int = 28, mode: str = "L") -> Path:
    from PIL import Image

    for split, classes in splits.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new(mode, (size, size), color=(17 * i) % 256 if mode == "L" else (17 * i % 256,) * 3).save(
                    d / f"{cls}{i}.png")
    return root


def folder_cfg(root: Path, **kw) -> C.Config:
    return C.load("fashion-mnist", {"data": str(root), "num_classes": 3, "workers": 0, **kw})


def labels(ds) -> list[int]:
    """Labels of a dataset as the trainer sees them (through Subset wrappers too)."""
    return [int(ds[i][1]) for i in range(len(ds))]


TINY = ["--recipe", "fashion-mnist", "--batch-size", "4", "--epochs", "1", "--set", "model_kwargs.depth=1",
        "--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.num_heads=2", "--amp", "none",
        "--no-progress", "--set", "threads=1", "--set", "workers=0", "--set", "tensorboard=false"]


# -- item 1: one class map for every split -----------------------------------------------------
def test_validation_split_takes_the_training_class_map(tmp_path: Path) -> None:
    """val/ lacks class b: its c images must keep c's training index (2), not become 1."""
    root = image_tree(tmp_path / "d", {"train": {"a": 2, "b": 2, "c": 2}, "validation": {"a": 1, "c": 3}})
    train, val = build_data(folder_cfg(root), device=CPU)
    assert sorted(Counter(labels(train.dataset)).items()) == [(0, 2), (1, 2), (2, 2)]
    assert labels(val.dataset) == [0, 2, 2, 2]


def test_eval_scores_with_the_training_class_map(tmp_path: Path, capsys) -> None:
    """The issue's run: a model that always answers class c, on a val/ without class b, is right on
    3 of 4 images (75%), not wrong on all of them."""
    root = image_tree(tmp_path / "d", {"train": {"a": 2, "b": 2, "c": 2}, "validation": {"a": 1, "c": 3}})
    assert main(["train", *TINY, "--data", str(root), "--set", "num_classes=3", "--max-steps", "1",
                 "--output", str(tmp_path), "--run-name", "r"]) == 0
    ck = checkpoint.load(tmp_path / "r")
    head = [k for k in ck["model"] if k.startswith("head.")]
    for k in head:
        ck["model"][k].zero_()
    ck["model"]["head.bias"][2] = 10.0  # always class c
    checkpoint.save(tmp_path / "c.pt", {k: v for k, v in ck.items() if k not in ("format", "version")})
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "c.pt"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["count"] == 4 and r["top1"] == pytest.approx(75.0)
    # masksub eval --data on another copy of the tree (the training one is gone): the same map
    other = image_tree(tmp_path / "copy", {"train": {"a": 1, "b": 1, "c": 1}, "validation": {"c": 2, "a": 2}})
    import shutil

    shutil.rmtree(root)
    assert main(["eval", "--checkpoint", str(tmp_path / "c.pt"), "--data", str(other), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["count"] == 4 and r["top1"] == pytest.approx(50.0)


def test_eval_on_a_folder_with_only_a_validation_split(tmp_path: Path, capsys) -> None:
    """Refused with the fix in the message; the fix (its own folders as the class map) works."""
    root = image_tree(tmp_path / "d", {"train": {"a": 1, "b": 1, "c": 1}, "validation": {"a": 1, "c": 1}})
    assert main(["train", *TINY, "--data", str(root), "--set", "num_classes=3", "--max-steps", "1",
                 "--output", str(tmp_path), "--run-name", "r"]) == 0
    only = image_tree(tmp_path / "only", {"validation": {"a": 2, "b": 1, "c": 1}})
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "r"), "--data", str(only)]) == 2
    err = capsys.readouterr().err
    assert "no training folder 'train'" in err and "--set train_split=validation" in err
    assert main(["eval", "--checkpoint", str(tmp_path / "r"), "--data", str(only), "--set", "train_split=validation",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 4


def test_validation_class_the_training_split_lacks_is_refused(tmp_path: Path, capsys) -> None:
    root = image_tree(tmp_path / "d", {"train": {"a": 2, "b": 2}, "validation": {"a": 1, "zebra": 1}})
    rc = main(["train", *TINY, "--data", str(root), "--set", "num_classes=3", "--output", str(tmp_path),
               "--run-name", "r"])
    err = capsys.readouterr().err
    assert rc == 2 and "'zebra'" in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


# -- item 2: subset / val_subset are seeded, class-balanced samples --------------------------------
def test_imagefolder_subset_is_a_seeded_class_balanced_sample(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "d", {"train": {"a": 6, "b": 6, "c": 6}, "validation": {"a": 4, "b": 4, "c": 1}})
    cfg = folder_cfg(root, subset=6, val_subset=7, analysis_subset=3)
    train, val = build_data(cfg, device=CPU)
    assert sorted(Counter(labels(train.dataset)).values()) == [2, 2, 2]  # not [0,0,0,0,1,1]
    assert sorted(Counter(labels(val.dataset)).items()) == [(0, 3), (1, 3), (2, 1)]  # c has 1: all of it
    assert sorted(Counter(labels(train.plain_dataset)).values()) == [1, 1, 1]

    def files(data) -> list[str]:
        return [p for p, _ in data.dataset.reader.samples]

    # the same sample on every rank, for any training seed (a resume rebuilds it from the config)
    for rank, seed in ((1, 0), (0, 5)):
        other, _ = build_data(folder_cfg(root, subset=6, val_subset=7, seed=seed), device=CPU, rank=rank, world=2)
        assert files(other) == files(train)
    # another subset_seed draws another sample (first files of each class are not always taken)
    samples = {tuple(files(build_data(folder_cfg(root, subset=6, subset_seed=s), device=CPU)[0])) for s in range(6)}
    assert len(samples) > 1
    # the seed is frozen on --resume, as subset is
    from masksub.train.cli_train import FROZEN_ON_RESUME

    assert "subset_seed" in FROZEN_ON_RESUME


def test_subset_indices_balance() -> None:
    from masksub.train.imagefolder import subset_indices

    targets = [0] * 1 + [1] * 10 + [2] * 10
    idx = subset_indices(len(targets), 9, seed=3, targets=targets)
    assert idx == sorted(idx) and len(set(idx)) == 9
    assert sorted(Counter(targets[i] for i in idx).items()) == [(0, 1), (1, 4), (2, 4)]
    assert idx == subset_indices(len(targets), 9, seed=3, targets=targets)
    assert subset_indices(5, 10, seed=0, targets=[0] * 5) == [0, 1, 2, 3, 4]


# -- messages: symlink loops, class folders past num_classes -----------------------------------
def test_symlink_loop_is_not_followed(tmp_path: Path, capsys) -> None:
    root = image_tree(tmp_path / "d", {"train": {"a": 2, "b": 3}, "validation": {"a": 1, "b": 1}})
    os.symlink("..", root / "train" / "a" / "loop")
    train, val = build_data(folder_cfg(root, num_classes=2), device=CPU)
    paths = [p for p, _ in train.dataset.reader.samples]
    assert len(paths) == 5 and len({os.path.realpath(p) for p in paths}) == 5
    assert "not followed" in capsys.readouterr().err


def test_more_class_folders_than_num_classes_is_refused_before_training(tmp_path: Path, capsys) -> None:
    root = image_tree(tmp_path / "d", {"train": {"a": 1, "b": 1, "c": 1}, "validation": {"a": 1}})
    rc = main(["train", *TINY, "--data", str(root), "--set", "num_classes=2", "--output", str(tmp_path),
               "--run-name", "r"])
    err = capsys.readouterr().err
    assert rc == 2 and "3 class folders" in err and "num_classes is 2" in err, err
    assert not (tmp_path / "r").exists()


# -- item 4: compare --resume after the recipe changed -------------------------------------------
def test_compare_resume_refuses_a_changed_recipe(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    text = ("model: vit_tiny_patch16_224\nmodel_kwargs: {patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}\n"
            "img_size: 28\nin_chans: 1\nnum_classes: 10\ndata: synthetic\nsynthetic_size: 8\n"
            "synthetic_val_size: 4\nbatch_size: 4\nlr: 1.0e-3\nepochs: 1\nwarmup_epochs: 0\namp: none\n"
            "threads: 1\nprogress: false\ntensorboard: false\n")
    recipe.write_text(text)
    out = tmp_path / "cmp"
    assert main(["compare", "--recipe", str(recipe), "--settings", "baseline,masksub", "--no-analysis",
                 "--out", str(out)]) == 0
    (out / "masksub-seed0" / "summary.json").unlink()  # as if stopped during the masksub run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    recipe.write_text(text.replace("batch_size: 4", "batch_size: 2").replace("lr: 1.0e-3", "lr: 5.0e-2"))
    capsys.readouterr()
    rc = main(["compare", "--resume", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "batch_size (4 -> 2)" in err and "lr (0.001 -> 0.05)" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    plan = json.loads((out / "compare.json").read_text())
    assert plan["configs"]["masksub-seed0"]["batch_size"] == 4  # each setting's resolved config recorded
    recipe.write_text(text)  # restored: the comparison continues
    assert main(["compare", "--resume", str(out)]) == 0


# -- item 8: eval --export is a plain timm state dict ---------------------------------------------
FAMILIES = {  # model, model_kwargs, img_size
    "convnext": ("convnext_atto", {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}, 64),
    "swin": ("swin_tiny_patch4_window7_224", {"depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                                              "embed_dim": 16, "window_size": 2}, 64),
    "beit": ("beitv2_base_patch16_224", {"depth": 1, "embed_dim": 32, "num_heads": 2}, 64),
    "vit_relpos": ("vit_relpos_small_patch16_224", {"depth": 1, "embed_dim": 32, "num_heads": 2}, 64),
    "vit": ("vit_tiny_patch16_224", {"depth": 1, "embed_dim": 32, "num_heads": 2}, 64),
    "resnet": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}, 64),
}


MASK_TOKEN = ("convnext", "swin", "beit", "vit_relpos")  # the families whose sub-branch adds a token


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_strictly_into_plain_timm(tmp_path: Path, family: str) -> None:
    import timm

    name, kw, size = FAMILIES[family]
    argv = ["train", "--recipe", "fashion-mnist", "--data", "synthetic", "--model", name,
            "--set", f"model_kwargs={json.dumps(kw)}", "--set", f"img_size={size}", "--set", "in_chans=3",
            "--set", "num_classes=5", "--set", "synthetic_size=2", "--set", "synthetic_val_size=2",
            "--batch-size", "2", "--epochs", "1", "--max-steps", "1", "--amp", "none", "--no-progress",
            "--set", "threads=1", "--set", "tensorboard=false", "--set", "drop_path=0",
            "--output", str(tmp_path), "--run-name", "r"]
    assert main(argv) == 0
    run_sd = checkpoint.load(tmp_path / "r")["model"]
    assert ("masksub_mask_token" in run_sd) == (family in MASK_TOKEN), sorted(run_sd)[:3]
    export = tmp_path / "export.pt"
    assert main(["eval", "--checkpoint", str(tmp_path / "r"), "--export", str(export)]) == 0
    sd = torch.load(export, weights_only=True)
    assert not [k for k in sd if "masksub" in k]
    args = dict(kw, num_classes=5)
    if family != "convnext" and family != "resnet":
        args["img_size"] = size
    model = timm.create_model(name, pretrained=False, **args)
    model.load_state_dict(sd)  # strict: no unexpected, no missing key
    for k, v in sd.items():
        assert torch.equal(v, run_sd[k]), k
