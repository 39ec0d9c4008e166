"""Repeated augmentation: DeiT's RASampler order, each rank its share under torchrun, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from masksub.cli import main
from masksub.errors import MaskSubError
from masksub.train import checkpoint
from masksub.train import config as C
from masksub.train.data import build_data
from masksub.train.sampler import repeated_order

HERE = Path(__file__).parent


@pytest.mark.parametrize("n", [10, 24, 300, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_order_is_timms_repeat_aug_sampler(n: int, world: int) -> None:
    """Seed 0: the same indices as timm's RepeatAugSampler (= DeiT samplers.py RASampler)."""
    from timm.data.distributed_sampler import RepeatAugSampler

    for epoch in (0, 3):
        for rank in range(world):
            s = RepeatAugSampler(range(n), num_replicas=world, rank=rank, num_repeats=3)
            s.set_epoch(epoch)
            assert repeated_order(n, 0, epoch, 3, rank, world).tolist() == list(s)


def test_copies_go_to_different_ranks_and_epochs_differ() -> None:
    n, world = 600, 3
    orders = [repeated_order(n, 7, 0, 3, r, world) for r in range(world)]
    assert {len(o) for o in orders} == {n // 256 * 256 // world}  # an epoch as long as a plain one
    for o in orders:  # with 3 ranks, the 3 copies of an image land one on each rank
        assert len(set(o.tolist())) == len(o)
    common = set(orders[0].tolist()) & set(orders[1].tolist()) & set(orders[2].tolist())
    assert len(common) > 0.9 * len(orders[0])
    one = repeated_order(n, 7, 0, 3, 0, 1)  # one process: the copies are neighbours in the batch
    assert (one[0:3] == one[0]).all() and (one[3:6] == one[3]).all()
    assert not torch.equal(repeated_order(n, 7, 1, 3, 0, world), orders[0])
    assert not torch.equal(repeated_order(n, 8, 0, 3, 0, world), orders[0])


def test_trainer_data_uses_it(tmp_path: Path) -> None:
    cfg = C.load("fashion-mnist", {"data": "synthetic", "synthetic_size": 12, "repeated_aug": 3,
                                   "batch_size": 6, "output": str(tmp_path)})
    train, val = build_data(cfg, device=torch.device("cpu"))
    assert train.repeats == 3 and val.repeats == 0
    labels = torch.cat([y for _, y in train.iterate(0, 0)])
    want = train.labels[repeated_order(12, cfg.seed, 0, 3, 0, 1)[: len(labels)]]
    assert torch.equal(labels, want)
    with pytest.raises(MaskSubError, match="repeated_aug"):
        C.load("fashion-mnist", {"data": "synthetic", "repeated_aug": 1})


# 12 images, batch 4, repeated x3 on one process: 3 steps per epoch; step 4 crosses the epoch end.
BASE = ["train", "--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=12",
        "--set", "synthetic_val_size=4", "--batch-size", "4", "--epochs", "2", "--set", "repeated_aug=3",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.num_heads=2",
        "--amp", "none", "--no-progress", "--set", "mixup=0.5", "--set", "log_every=1", "--set", "tensorboard=false"]


def test_resume_with_repeated_aug_is_exact(tmp_path: Path) -> None:
    assert main([*BASE, "--max-steps", "4", "--output", str(tmp_path), "--run-name", "straight"]) == 0
    assert main([*BASE, "--max-steps", "2", "--output", str(tmp_path), "--run-name", "cut"]) == 0
    assert main(["train", "--resume", str(tmp_path / "cut"), "--max-steps", "4"]) == 0
    a, b = checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "cut")
    assert a["global_step"] == b["global_step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_torchrun_each_rank_its_share(tmp_path: Path) -> None:
    """2 processes (gloo): each rank trains on its own RASampler share, the copies of an image split."""
    from timm.data.distributed_sampler import RepeatAugSampler

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ra_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"order-{r}.json").read_text()) for r in (0, 1)]
    n = 24
    for r in ranks:
        assert r["world"] == 2
        for ep in (0, 1):  # seed 0 of the recipe: exactly timm's / DeiT's sampler
            s = RepeatAugSampler(range(n), num_replicas=2, rank=r["rank"], num_repeats=3)
            s.set_epoch(ep)
            assert r["orders"][str(ep)] == list(s)
        assert r["batches"] == n // 2 // 4  # each rank: a plain epoch's share, 12 images
    both = [Counter(r["orders"]["0"]) for r in ranks]
    assert set(both[0]) & set(both[1]), "no image had copies on both ranks"
    recs = [json.loads(s) for s in (tmp_path / "ra" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(e["train_steps"] == 6 for e in epochs)  # 3 steps x 2 ranks


def test_image_folder_copies_get_their_own_3augment(tmp_path: Path) -> None:
    """The timm/DataLoader path: on one process the 3 copies of an image are neighbours, each
    with its own 3-Augment draw (DeiT-III's recipe, real transforms on real files)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "validation"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                arr = torch.randint(0, 255, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(tmp_path / split / c / f"{i}.png")
    cfg = C.load("deit3-vit-s-400", {"data": str(tmp_path), "num_classes": 2, "img_size": 32, "batch_size": 6,
                                     "workers": 0, "output": str(tmp_path / "runs")})
    assert cfg.repeated_aug == 3 and cfg.aug == "3aug"
    train, _ = build_data(cfg, device=torch.device("cpu"))
    assert train.num_batches(0) == 1  # 8 images -> 8 samples per epoch (n < 256: ceil(n / world))
    x, y = next(iter(train.iterate(0, 0)))
    order = repeated_order(8, cfg.seed, 0, 3, 0, 1)
    assert order[:3].unique().numel() == 1 and order[3:6].unique().numel() == 1
    assert y[0] == y[1] == y[2] and y[3] == y[4] == y[5]
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])  # same image, own augmentations
