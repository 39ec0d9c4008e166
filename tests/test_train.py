"""``masksub train`` / ``masksub eval`` end to end on tiny synthetic runs (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from masksub.cli import main

TINY = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=8",
        "--set", "synthetic_val_size=4", "--batch-size", "4", "--epochs", "1",
        "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
        "--set", "model_kwargs.num_heads=2", "--amp", "none", "--no-progress", "--set", "log_every=1"]


def lines(run: Path, kind: str) -> list[dict]:
    recs = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


@pytest.mark.parametrize("extra", [["--sub", "none"], ["--sub", "mask"], ["--sub", "dropout"],
                                   ["--sub", "droppath"], ["--sub", "mask", "--masking-only"]],
                         ids=["none", "mask", "dropout", "droppath", "masking_only"])
def test_two_step_run_writes_run_dir(tmp_path: Path, extra: list[str], capsys) -> None:
    assert main(["train", *TINY, *extra, "--output", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir()), "no TensorBoard events"
    steps, epochs = lines(run, "step"), lines(run, "epoch")
    assert [s["step"] for s in steps] == [1, 2]
    assert len(epochs) == 1 and epochs[0]["val_count"] == 4
    for key in ("top1", "top5", "val_loss", "loss_main", "time_s"):
        assert key in epochs[0]
    has_sub = extra[1] != "none" and "--masking-only" not in extra
    assert (steps[0]["loss_sub"] is not None) == has_sub
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["top1"] == epochs[0]["top1"]
    out = capsys.readouterr().out
    assert "top-1" in out and str(run) in out


def test_analysis_and_accumulation(tmp_path: Path) -> None:
    """analysis: true logs Eq. 1 / Eq. 2 train losses and per-branch grad norms; accum + EMA run."""
    argv = ["train", *TINY, "--set", "synthetic_size=16", "--accum-steps", "2", "--analysis",
            "--set", "grad_norm_every=1", "--set", "ema=true", "--output", str(tmp_path), "--run-name", "a"]
    assert main(argv) == 0
    ep = lines(tmp_path / "a", "epoch")[0]
    assert ep["train_steps"] == 2  # 16 images / (4 x 2 accumulated) = 2 updates
    for key in ("train_loss_unmasked", "train_loss_masked", "grad_norm_main", "grad_norm_sub", "ema_top1"):
        assert isinstance(ep[key], float), key
    assert ep["grad_norm_main"] > 0 and ep["grad_norm_sub"] > 0


def test_eval_matches_training_eval(tmp_path: Path, capsys) -> None:
    assert main(["train", *TINY, "--output", str(tmp_path), "--run-name", "e"]) == 0
    top1 = lines(tmp_path / "e", "epoch")[0]["top1"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "e"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["count"] == 4 and r["top1"] == pytest.approx(top1)


def _err(tmp_path: Path, capsys, *argv: str) -> str:
    rc = main(["train", *TINY, "--output", str(tmp_path), "--run-name", "bad", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not (tmp_path / "bad").exists(), "a run directory was made before the error"
    return err


def test_wrong_key_suggests(tmp_path: Path, capsys) -> None:
    err = _err(tmp_path, capsys, "--set", "lrr=0.1")
    assert "unknown config key 'lrr'" in err and "'lr'" in err


def test_wrong_key_in_recipe_file(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet18\nwieght_decay: 0.1\n")
    assert main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "wieght_decay" in err and "weight_decay" in err


def test_missing_data_path(tmp_path: Path, capsys) -> None:
    err = _err(tmp_path, capsys, "--data", str(tmp_path / "nope"))
    assert "does not exist" in err and "nope" in err


def test_unknown_model_suggests(tmp_path: Path, capsys) -> None:
    err = _err(tmp_path, capsys, "--model", "vit_tiny_patch16_22")
    assert "timm does not know" in err and "vit_tiny_patch16_224" in err


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "1.0"])
def test_ratio_out_of_range(tmp_path: Path, capsys, ratio: str) -> None:
    err = _err(tmp_path, capsys, f"--ratio={ratio}")
    assert "must be in [0, 1)" in err


def test_image_size_mask_patch_does_not_divide(tmp_path: Path, capsys) -> None:
    """A CNN recipe at 48 px: the 32 px mask squares do not tile it."""
    err = _err(tmp_path, capsys, "--model", "resnet18", "--set", "model_kwargs={}",
               "--set", "img_size=48")
    assert "not divisible" in err and "48" in err


def test_unknown_recipe_and_bad_value(tmp_path: Path, capsys) -> None:
    assert main(["train", "--recipe", "fashion-mnist-quik"]) == 2
    assert "did you mean fashion-mnist-quick" in capsys.readouterr().err
    err = _err(tmp_path, capsys, "--set", "batch_size=many")
    assert "batch_size must be of type int" in err
    err = _err(tmp_path, capsys, "--sub", "masks")
    assert "did you mean 'mask'" in err


def test_imagefolder_through_timm(tmp_path: Path) -> None:
    """An ImageFolder tree goes through timm's create_dataset / create_transform and a DataLoader."""
    from PIL import Image

    for split in ("train", "validation"):
        for c in range(2):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(6 if split == "train" else 2):
                Image.new("RGB", (40, 36), (120 * c, 30 * i, 90)).save(d / f"{i}.png")
    argv = ["train", "--recipe", "fashion-mnist", "--data", str(tmp_path / "data"), "--set", "in_chans=3",
            "--set", "num_classes=2", "--set", "img_size=32", "--set", "model_kwargs.patch_size=8",
            "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
            "--set", "model_kwargs.num_heads=2", "--set", "aug=timm", "--set", "auto_augment=rand-m9-mstd0.5",
            "--set", "workers=0", "--batch-size", "4", "--epochs", "1", "--amp", "none", "--no-progress",
            "--output", str(tmp_path), "--run-name", "f"]
    assert main(argv) == 0
    ep = lines(tmp_path / "f", "epoch")[0]
    assert ep["val_count"] == 4 and ep["train_steps"] == 3


def test_finetune_from_local_pretrained_file(tmp_path: Path) -> None:
    """pretrained_file loads a local state dict (head of another size skipped) before training."""
    import torch

    from masksub.train import config as C
    from masksub.train.build import build_model

    cfg = C.load("fashion-mnist", {"model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
                                   "num_classes": 7})
    src = build_model(cfg)
    torch.save({"model": src.state_dict()}, tmp_path / "pre.pth")
    cfg2 = C.load("fashion-mnist", {"model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
                                    "pretrained_file": str(tmp_path / "pre.pth")})
    model = build_model(cfg2)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape[0] == 10
    cfg2.pretrained_file = str(tmp_path / "missing.pth")
    with pytest.raises(Exception, match="does not exist"):
        build_model(cfg2)


def test_streaming_data_batches_resume_offset_and_size_error() -> None:
    """StreamData (webdataset / streaming HF readers): the reader's epoch is set, whole batches
    only in training, ``start`` skips batches for a resume, and a reader without a size fails."""
    import torch

    from masksub import MaskSubError
    from masksub.train.data import StreamData

    class Stream(torch.utils.data.IterableDataset):
        def __init__(self, n, sized=True):
            self.n, self.sized, self.epochs = n, sized, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __len__(self):
            if not self.sized:
                raise TypeError("no size")
            return self.n

        def __iter__(self):
            return iter((torch.full((1, 2, 2), float(i)), torch.tensor(i)) for i in range(self.n))

    ds = Stream(10)
    data = StreamData(ds, batch_size=4, train=True, workers=0, device=torch.device("cpu"))
    assert data.num_batches() == 2
    assert [y.tolist() for _, y in data.iterate(3)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [y.tolist() for _, y in data.iterate(4, start=1)] == [[4, 5, 6, 7]]
    assert ds.epochs == [3, 4]
    val = StreamData(Stream(10), batch_size=4, train=False, workers=0, device=torch.device("cpu"))
    assert [len(y) for _, y in val.iterate()] == [4, 4, 2]
    with pytest.raises(MaskSubError, match="needs its size"):
        next(StreamData(Stream(10, sized=False), batch_size=4, train=True, workers=0,
                        device=torch.device("cpu")).iterate())


@pytest.mark.parametrize("masking_only, tokens", [(False, 1 + 49), (True, 1 + 24)])
def test_masking_only_trains_the_single_branch_on_masked_input(masking_only: bool, tokens: int,
                                                               tmp_path: Path) -> None:
    """Eq. (2): every training forward sees the masked image (28 px, patch 4: 49 patches, 25
    removed at 0.5); with the sub-branch off the same step sees all of them."""
    from masksub.train import config as C
    from masksub.train.engine import Trainer

    sub = {"sub": "mask", "masking_only": True} if masking_only else {"sub": "none", "ratio": None}
    cfg = C.load("fashion-mnist", {"data": "synthetic", "synthetic_size": 8, "synthetic_val_size": 4,
                                   "batch_size": 4, "amp": "none", "progress": False, "tensorboard": False,
                                   "output": str(tmp_path),
                                   **C.parse_sets(["model_kwargs.depth=1", "model_kwargs.embed_dim=32",
                                                   "model_kwargs.num_heads=2"]), **sub})
    tr = Trainer(cfg, run_dir=None)
    seen: list[int] = []
    tr.model_raw.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    tr._it = tr.train_data.iterate(0, 0)
    stats = tr._update()
    assert stats is not None and seen == [tokens]
