"""Every recipe loads, and builds its model, data pipeline, optimizer and schedule at tiny size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from masksub.train import config as C
from masksub.train.data import build_transforms
from masksub.train.engine import Trainer

RECIPES = C.recipe_names()
# A tiny version of each family: same model class, same code paths, a fraction of the size.
TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}
TINY = {
    "vit": {"model_kwargs": TINY_VIT},
    "swin": {"model_kwargs": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}},
    "resnet": {"model_kwargs": {"layers": [1, 1, 1, 1]}, "img_size": 64},
}


def tiny(name: str) -> dict:
    model = yaml.safe_load(C.find_recipe(name).read_text())["model"]
    fam = "swin" if model.startswith("swin") else "resnet" if model.startswith("resnet") else "vit"
    over = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY[fam].items()}
    over.update(data="synthetic", synthetic_size=4, synthetic_val_size=2, batch_size=2,
                progress=False, tensorboard=False, workers=0)
    return over


def test_paper_rows_are_all_there() -> None:
    want = {f"deit3-vit-{s}-{e}" for s in "sblh" for e in (400, 800)}
    want |= {"mae-ft-vit-b", "mae-ft-vit-l", "mae-ft-vit-h", "beitv2-ft-vit-b", "ftclip-vit-b",
             "rsb-a2-resnet50", "rsb-a2-resnet101", "rsb-a2-resnet152", "swin-t", "swin-s", "swin-b",
             "fashion-mnist", "fashion-mnist-quick"}
    assert want <= set(RECIPES)
    for name in RECIPES:
        cfg = yaml.safe_load(C.find_recipe(name).read_text())
        assert cfg.get("source"), f"{name} has no source line"


def test_fashion_mnist_recipe_is_design_md() -> None:
    cfg = C.load("fashion-mnist")
    assert (cfg.img_size, cfg.in_chans, cfg.drop_path, cfg.opt, cfg.lr, cfg.weight_decay) == (
        28, 1, 0.1, "adamw", 2e-3, 0.05)
    assert cfg.model_kwargs == {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3}
    assert (cfg.batch_size, cfg.epochs, cfg.warmup_epochs, cfg.clip_grad, cfg.amp) == (512, 30, 2, 1.0, "bf16")
    assert (cfg.crop_pad, cfg.hflip, cfg.sched, cfg.sub, cfg.ratio) == (2, 0.5, "cosine", "mask", 0.5)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_and_steps(name: str, tmp_path: Path) -> None:
    cfg = C.load(name, tiny(name) | {"output": str(tmp_path)})
    # the real (ImageNet-style) input pipeline of the recipe, on one image
    train_tf, eval_tf = build_transforms(cfg)
    img = Image.new("L" if cfg.in_chans == 1 else "RGB", (cfg.img_size + 16, cfg.img_size + 8))
    for tf in (train_tf, eval_tf):
        assert tuple(tf(img).shape) == (cfg.in_chans, cfg.img_size, cfg.img_size)
    t = Trainer(cfg)
    assert t.ms.branch is not None and t.updates_per_epoch == 2
    lrs = set()
    total = cfg.epochs * t.updates_per_epoch
    for step in sorted({int(total * f) for f in (0, 0.001, 0.01, 0.3, 0.6, 0.9)}):  # warm-up, cosine
        t.scheduler.step_update(step)
        lrs.add(round(t.optimizer.param_groups[0]["lr"], 12))
    assert len(lrs) > 2
    if cfg.layer_decay:
        scales = {g.get("lr_scale", 1.0) for g in t.optimizer.param_groups}
        assert len(scales) > 1, "layer-wise lr decay made no groups"
    if name.startswith("beit"):
        assert t.ms.branch.name == "beit" and t.ms.branch.block
        assert hasattr(t.model_raw, "masksub_mask_token")
    if name.startswith("swin"):
        assert t.ms.branch.name == "swin"
    before = [p.detach().clone() for p in t.model_raw.parameters()]
    t._it = t.train_data.iterate(0, 0)
    ok, res = t._update()
    assert ok and torch.isfinite(res[0]) and torch.isfinite(res[1])
    changed = sum(not torch.equal(a, p) for a, p in zip(before, t.model_raw.parameters(), strict=True))
    assert changed > 0
    t.log.close()
