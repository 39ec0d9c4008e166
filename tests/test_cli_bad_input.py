"""Bad input through the real ``masksub`` command line, one table: every row must exit with code 2,
print one line that names the bad value (no traceback), and leave the folders as they were
(nothing half-written that would block a rerun). Rows run in-process through ``masksub.cli.main``
(the entry point's own function); a few also through ``python -m masksub.cli`` in a subprocess.
Every row is refused before any training step."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from masksub.cli import main
from masksub.train import checkpoint

MODEL = ["--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.num_heads=2"]
QUIET = ["--amp", "none", "--no-progress", "--set", "threads=1", "--set", "workers=0", "--set", "tensorboard=false"]
BASE = ["--recipe", "fashion-mnist", "--data", "synthetic", "--set", "synthetic_size=8", "--set",
        "synthetic_val_size=4", "--batch-size", "4", "--epochs", "1", *MODEL, *QUIET]
TRAIN = ["train", *BASE, "--output", "{tmp}/runs", "--run-name", "bad"]
COMPARE = ["compare", *BASE, "--no-analysis", "--settings", "baseline,masksub"]
EVAL = ["eval", "--checkpoint", "{tmp}/run"]


@dataclass
class Row:
    id: str
    argv: list[str]
    names: list[str]  # what the one line must say: the bad value, at least
    setup: Callable[[Path], None] | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    subprocess: bool = False  # also through `python -m masksub.cli`


# -- what rows set up in their own tmp folder ------------------------------------------------
TRAINED: dict[str, Path] = {}


def run(tmp: Path) -> None:
    """A copy of a trained run (1 step of 3 epochs) at tmp/run."""
    shutil.copytree(TRAINED["run"], tmp / "run")


def nan_checkpoint(tmp: Path) -> None:
    run(tmp)
    ck = checkpoint.load(tmp / "run")
    ck["model"]["head.weight"].fill_(float("nan"))
    checkpoint.save(tmp / "run" / "nan.pt", {k: v for k, v in ck.items() if k not in ("format", "version")})


def no_config(tmp: Path) -> None:
    run(tmp)
    ck = checkpoint.load(tmp / "run")
    checkpoint.save(tmp / "noconf.pt", {k: v for k, v in ck.items() if k not in ("format", "version", "config")})


def truncated(tmp: Path) -> None:
    data = (TRAINED["run"] / "last.pt").read_bytes()
    (tmp / "trunc.pt").write_bytes(data[: len(data) // 2])


def plain_pt(tmp: Path) -> None:
    torch.save({"model": {}}, tmp / "plain.pt")


def tree(tmp: Path, splits: dict[str, list[str]], name: str = "d") -> None:
    from PIL import Image

    for split, classes in splits.items():
        for cls in classes:
            (tmp / name / split / cls).mkdir(parents=True)
            Image.new("L", (28, 28), color=90).save(tmp / name / split / cls / "0.png")


def abc_tree(tmp: Path) -> None:
    tree(tmp, {"train": ["a", "b", "c"], "validation": ["a", "b"]})


def zebra_tree(tmp: Path) -> None:
    tree(tmp, {"train": ["a", "b"], "validation": ["a", "zebra"]})


def no_val_tree(tmp: Path) -> None:
    tree(tmp, {"train": ["a", "b"], "test": ["a", "b"]})


def only_val_tree(tmp: Path) -> None:
    run(tmp)
    tree(tmp, {"validation": ["a", "b"]})


def eleven_class_tree(tmp: Path) -> None:
    run(tmp)
    tree(tmp, {"train": [f"c{i:02d}" for i in range(11)], "validation": ["c00"]})


def empty_split_tree(tmp: Path) -> None:
    tree(tmp, {"train": ["a", "b"]})
    (tmp / "d" / "validation" / "a").mkdir(parents=True)
    (tmp / "d" / "validation" / "a" / "notes.txt").write_text("no images here")


def fmnist_dir(tmp: Path, damage: str) -> None:
    d = tmp / "fm"
    d.mkdir()
    src = Path("/usr/share/datasets/fashion-mnist")
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        if (src / f).is_file() and "labels" in f:
            shutil.copy(src / f, d / f)
        else:  # a small valid IDX file (images: 2 of 28x28, labels: 2)
            images = "images" in f
            head = bytes([0, 0, 8, 3 if images else 1]) + (2).to_bytes(4, "big")
            head += (28).to_bytes(4, "big") * 2 if images else b""
            with gzip.open(d / f, "wb") as g:
                g.write(head + bytes(2 * 28 * 28 if images else 2))
    target = d / "t10k-images-idx3-ubyte.gz"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[:30])
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "short":  # gunzips fine, but holds fewer bytes than its header says
        with gzip.open(target, "wb") as g:
            g.write(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(100))


def file_at(name: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).write_text("a file, not a folder")
    return make


def recipe_file(text: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / "r.yaml").write_text(text)
    return make


def comparison(tmp: Path) -> None:
    (tmp / "cmp").mkdir()
    (tmp / "cmp" / "compare.json").write_text("{}")


def metrics(lines: list[bytes], epochs: bool = True) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / "r").mkdir()
        (tmp / "r" / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return make


EPOCH = json.dumps({"kind": "epoch", "epoch": 1, "top1": 50.0}).encode()


def also(*fns: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        for f in fns:
            f(tmp)
    return make


def export_fails(mp: pytest.MonkeyPatch) -> None:
    def refuse(model, path):  # the disk refuses the write (EACCES / read-only mount)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    mp.setattr(checkpoint, "export_weights", refuse)


ROWS = [
    # -- train: config keys and values --------------------------------------------------------
    Row("unknown-key", [*TRAIN, "--set", "lrr=0.1"], ["'lrr'", "'lr'"], subprocess=True),
    Row("unknown-key-in-recipe", ["train", "--recipe", "{tmp}/r.yaml"], ["wieght_decay"],
        recipe_file("model: resnet18\nwieght_decay: 0.1\n")),
    Row("recipe-not-yaml", ["train", "--recipe", "{tmp}/r.yaml"], ["r.yaml", "not valid YAML"],
        recipe_file("model: [resnet18\n")),
    Row("recipe-not-mapping", ["train", "--recipe", "{tmp}/r.yaml"], ["r.yaml", "mapping"], recipe_file("- 1\n")),
    Row("recipe-file-missing", ["train", "--recipe", "{tmp}/nope.yaml"], ["nope.yaml"]),
    Row("recipe-name-typo", ["train", "--recipe", "fashion-mnist-quik"], ["fashion-mnist-quik", "fashion-mnist-quick"]),
    Row("no-recipe", ["train"], ["--recipe"]),
    Row("bad-int", [*TRAIN, "--set", "batch_size=many"], ["batch_size", "'many'"]),
    Row("bad-choice", [*TRAIN, "--sub", "masks"], ["'masks'", "'mask'"]),
    Row("set-without-equals", [*TRAIN, "--set", "lr"], ["'lr'", "key=value"]),
    Row("set-dotted-non-mapping", [*TRAIN, "--set", "lr.x=1"], ["lr.x", "not a mapping"]),
    Row("missing-data-path", [*TRAIN, "--data", "{tmp}/nope"], ["nope", "does not exist"]),
    Row("unknown-model", [*TRAIN, "--model", "vit_tiny_patch16_22"], ["vit_tiny_patch16_22", "vit_tiny_patch16_224"]),
    Row("ratio-1.5", [*TRAIN, "--ratio=1.5"], ["got 1.5"]),
    Row("ratio-negative", [*TRAIN, "--ratio=-0.1"], ["got -0.1"]),
    Row("ratio-1", [*TRAIN, "--ratio=1.0"], ["got 1", "[0, 1)"]),
    Row("mask-patch-does-not-divide", [*TRAIN, "--model", "resnet18", "--set", "model_kwargs={}",
                                       "--set", "img_size=48"], ["48", "not divisible"]),
    Row("lr-inf", [*TRAIN, "--set", "lr=inf"], ["lr", "inf"]),
    Row("weight-decay-nan", [*TRAIN, "--set", "weight_decay=nan"], ["weight_decay", "nan"]),
    Row("clip-grad-inf", [*TRAIN, "--set", "clip_grad=inf"], ["clip_grad", "inf"]),
    Row("warmup-lr-nan", [*TRAIN, "--set", "warmup_lr=nan"], ["warmup_lr", "nan"]),
    Row("mixup-nan", [*TRAIN, "--set", "mixup=nan"], ["mixup", "nan"]),
    Row("lr-zero", [*TRAIN, "--set", "lr=0"], ["lr", "got 0"]),
    Row("epochs-zero", [*TRAIN, "--set", "epochs=0"], ["epochs", "got 0"]),
    Row("batch-zero", [*TRAIN, "--batch-size", "0"], ["batch_size", "got 0"]),
    Row("drop-path-1.5", [*TRAIN, "--set", "drop_path=1.5"], ["drop_path", "1.5"]),
    Row("aug-typo", [*TRAIN, "--set", "aug=3agu"], ["'3agu'", "'3aug'"]),
    Row("mixup-odd-batch", [*TRAIN, "--set", "mixup=0.8", "--batch-size", "3"], ["Mixup", "got 3"]),
    Row("repeated-aug-1", [*TRAIN, "--set", "repeated_aug=1"], ["repeated_aug", "got 1"]),
    Row("layer-decay-2", [*TRAIN, "--set", "layer_decay=2"], ["layer_decay", "got 2"]),
    Row("subset-seed-negative", [*TRAIN, "--set", "subset_seed=-3"], ["subset_seed", "-3"]),
    Row("device-foo", [*TRAIN, "--device", "foo"], ["'foo'"]),
    Row("device-cuda", [*TRAIN, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], ["cuda"]),
    Row("seed-negative", [*TRAIN, "--set", "seed=-1"], ["seed", "-1"]),
    Row("seed-too-big", [*TRAIN, "--set", "seed=5000000000"], ["seed", "5000000000"]),
    Row("mean-per-channel", [*TRAIN, "--set", "mean=[0.5, 0.5, 0.5]"], ["mean", "[0.5, 0.5, 0.5]"]),
    Row("std-per-channel", [*TRAIN, "--set", "std=[0.5, 0.5]"], ["std", "[0.5, 0.5]"]),
    Row("std-zero", [*TRAIN, "--set", "std=[0]"], ["std", "[0]"]),
    Row("threads-too-many", [*TRAIN, "--set", "threads=100000"], ["threads", "100000"]),
    Row("dist-typo", [*TRAIN, "--dist", "fdsp"], ["'fdsp'", "'fsdp'"]),
    Row("output-under-a-file", [*TRAIN, "--output", "{tmp}/file/runs"], ["file/runs"], file_at("file")),
    # -- train: a user's data -------------------------------------------------------------------
    Row("imagefolder-more-classes-than-num-classes", [*TRAIN, "--data", "{tmp}/d", "--set", "num_classes=2"],
        ["3 class folders", "num_classes is 2"], abc_tree),
    Row("imagefolder-val-class-not-in-train", [*TRAIN, "--data", "{tmp}/d", "--set", "num_classes=2"],
        ["'zebra'"], zebra_tree),
    Row("imagefolder-no-val-split", [*TRAIN, "--data", "{tmp}/d", "--set", "num_classes=2"],
        ["no validation folder", "val_split"], no_val_tree),
    Row("imagefolder-train-split-is-val-split", [*TRAIN, "--data", "{tmp}/d", "--set", "num_classes=3",
                                                 "--set", "train_split=validation"],
        ["train_split='validation'", "both name"], abc_tree),
    Row("imagefolder-no-train-split", [*TRAIN, "--data", "{tmp}/d", "--set", "num_classes=2",
                                       "--set", "train_split=training2"], ["'training2'"], abc_tree),
    Row("imagefolder-split-without-images", [*TRAIN, "--data", "{tmp}/d", "--set", "num_classes=2"],
        ["validation", "holds no images"], empty_split_tree),
    Row("fmnist-data-dir-missing", [*TRAIN, "--data", "fashion-mnist", "--set", "data_dir={tmp}/nowhere"],
        ["nowhere", "does not exist"]),
    Row("fmnist-gz-truncated", [*TRAIN, "--data", "fashion-mnist", "--set", "data_dir={tmp}/fm"],
        ["t10k-images-idx3-ubyte.gz", "truncated"], lambda t: fmnist_dir(t, "truncated")),
    Row("fmnist-gz-empty", [*TRAIN, "--data", "fashion-mnist", "--set", "data_dir={tmp}/fm"],
        ["t10k-images-idx3-ubyte.gz", "not a uint8 IDX file"], lambda t: fmnist_dir(t, "empty")),
    Row("fmnist-idx-short", [*TRAIN, "--data", "fashion-mnist", "--set", "data_dir={tmp}/fm"],
        ["t10k-images-idx3-ubyte.gz", "truncated"], lambda t: fmnist_dir(t, "short")),
    # -- train: runs and checkpoints ------------------------------------------------------------
    Row("run-directory-taken", [*TRAIN[:-1], "run", "--output", "{tmp}"], ["already holds a run", "--resume"], run),
    Row("resume-missing", ["train", "--resume", "{tmp}/nope"], ["nope", "does not exist"]),
    Row("resume-truncated", ["train", "--resume", "{tmp}/trunc.pt"], ["trunc.pt", "truncated"], truncated),
    Row("resume-not-a-checkpoint", ["train", "--resume", "{tmp}/plain.pt"], ["plain.pt", "not a masksub checkpoint"],
        plain_pt),
    Row("resume-no-config", ["train", "--resume", "{tmp}/noconf.pt"], ["noconf.pt", "no 'config'"], no_config),
    Row("resume-frozen-key", ["train", "--resume", "{tmp}/run", "--set", "opt=sgd"], ["opt", "'sgd'"], run),
    Row("resume-other-model", ["train", "--resume", "{tmp}/run", "--set", "model_kwargs.embed_dim=48"],
        ["model_kwargs", "48"], run),
    Row("resume-other-recipe", ["train", "--resume", "{tmp}/run", "--recipe", "fashion-mnist-quick"],
        ["--recipe fashion-mnist-quick"], run),
    Row("resume-subset-seed", ["train", "--resume", "{tmp}/run", "--set", "subset_seed=4"], ["subset_seed", "4"], run),
    # -- eval --------------------------------------------------------------------------------------
    Row("eval-missing", ["eval", "--checkpoint", "{tmp}/nope.pt"], ["nope.pt", "does not exist"], subprocess=True),
    Row("eval-truncated", ["eval", "--checkpoint", "{tmp}/trunc.pt"], ["trunc.pt", "truncated"], truncated),
    Row("eval-no-config", ["eval", "--checkpoint", "{tmp}/noconf.pt"], ["no 'config'"], no_config),
    Row("eval-nan-weights", ["eval", "--checkpoint", "{tmp}/run/nan.pt"], ["head.weight", "not finite"],
        nan_checkpoint),
    Row("eval-other-model", [*EVAL, "--set", "model_kwargs.depth=2"], ["another model"], run),
    Row("eval-no-ema", [*EVAL, "--ema"], ["no EMA"], run),
    Row("eval-device-foo", [*EVAL, "--device", "foo"], ["'foo'"], run),
    Row("eval-data-missing", [*EVAL, "--data", "{tmp}/nope"], ["nope", "does not exist"], run),
    Row("eval-data-only-validation", [*EVAL, "--data", "{tmp}/d"],
        ["no training folder 'train'", "found ['validation']", "--set train_split=validation"], only_val_tree),
    Row("eval-data-more-classes", [*EVAL, "--data", "{tmp}/d"],
        ["11 class folders", "the checkpoint's num_classes is 10"], eleven_class_tree),
    Row("eval-data-val-class-not-in-train", [*EVAL, "--data", "{tmp}/d"], ["'zebra'"], also(run, zebra_tree)),
    Row("eval-export-to-directory", [*EVAL, "--export", "{tmp}/exports"], ["exports", "is a directory"],
        also(run, lambda t: (t / "exports").mkdir())),
    Row("eval-export-under-a-file", [*EVAL, "--export", "{tmp}/file/model.pt"], ["file", "not a directory"],
        also(run, file_at("file")), subprocess=True),
    Row("eval-export-unwritable", [*EVAL, "--export", "{tmp}/model.pt"], ["model.pt", "Permission denied"],
        run, export_fails),
    Row("eval-export-then-bad-data", [*EVAL, "--export", "{tmp}/model.pt", "--data", "{tmp}/d"], ["'zebra'"],
        also(run, zebra_tree)),
    # -- compare -----------------------------------------------------------------------------------
    Row("compare-unknown-setting", [*COMPARE, "--settings", "baseline,masksubb", "--out", "{tmp}/x"], ["masksubb"]),
    Row("compare-out-is-a-file", [*COMPARE, "--out", "{tmp}/file"], ["file", "is a file"], file_at("file")),
    Row("compare-out-under-a-file", [*COMPARE, "--out", "{tmp}/file/cmp"], ["file/cmp", "which is a file"],
        file_at("file")),
    Row("compare-out-holds-a-comparison", [*COMPARE, "--out", "{tmp}/cmp"], ["already holds a comparison", "--resume"],
        comparison),
    Row("compare-resume-not-a-comparison", ["compare", "--resume", "{tmp}"], ["compare.json"]),
    Row("compare-sets-seed", [*COMPARE, "--set", "seed=1", "--out", "{tmp}/x"], ["'seed'", "--seeds"]),
    Row("compare-bad-seeds", [*COMPARE, "--seeds", "a,b", "--out", "{tmp}/x"], ["'a,b'"]),
    Row("compare-samebudget-alone", [*COMPARE, "--settings", "samebudget", "--out", "{tmp}/x"], ["samebudget"]),
    Row("compare-no-recipe", ["compare", "--out", "{tmp}/x"], ["--recipe"]),
    Row("compare-bad-value", [*COMPARE, "--set", "lr=-1", "--out", "{tmp}/x"], ["lr", "got -1"]),
    Row("compare-fmnist-data-dir-missing", [*COMPARE, "--data", "fashion-mnist", "--set", "data_dir={tmp}/nowhere",
                                            "--out", "{tmp}/x"], ["nowhere"]),
    Row("compare-imagefolder-more-classes", [*COMPARE, "--data", "{tmp}/d", "--set", "num_classes=2",
                                             "--out", "{tmp}/x"], ["3 class folders", "num_classes is 2"], abc_tree),
    # -- plot ----------------------------------------------------------------------------------------
    Row("plot-not-a-run", ["plot", "{tmp}"], ["not a run directory"]),
    Row("plot-out-is-a-file", ["plot", "{tmp}/r", "--out", "{tmp}/file"], ["file", "is a file"],
        also(metrics([EPOCH]), file_at("file"))),
    Row("plot-metrics-bad-byte", ["plot", "{tmp}/r", "--out", "{tmp}/png"], ["metrics.jsonl:2", "0xff"],
        metrics([EPOCH, b'{"kind": "epoch", "epoch": 2, "top1": 5\xff}', EPOCH])),
    Row("plot-metrics-not-json", ["plot", "{tmp}/r", "--out", "{tmp}/png"], ["metrics.jsonl:1", "not JSON"],
        metrics([b"{oops", EPOCH])),
    Row("plot-no-epochs", ["plot", "{tmp}/r", "--out", "{tmp}/png"], ["no epoch metrics"],
        metrics([json.dumps({"kind": "step", "step": 1}).encode()])),
    # -- bench, inspect ----------------------------------------------------------------------------
    Row("bench-batch-name", ["bench", "--device", "cpu", "--models", "tiny_vit", "--batch", "vit_b=4",
                             "--out", "{tmp}/b"], ["'vit_b'"]),
    Row("bench-ratio", ["bench", "--device", "cpu", "--models", "tiny_vit", "--ratio", "1.5", "--out", "{tmp}/b"],
        ["1.5"]),
    Row("bench-steps", ["bench", "--device", "cpu", "--models", "tiny_vit", "--steps", "0", "--out", "{tmp}/b"],
        ["steps"]),
    Row("inspect-unknown-model", ["inspect", "resnet_fifty"], ["'resnet_fifty'"]),
    Row("inspect-option-not-key-value", ["inspect", "resnet18", "--option", "patch_size"], ["--option", "'patch_size'"]),
]


@pytest.fixture(scope="module", autouse=True)
def trained(tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", *BASE, "--set", "epochs=3", "--max-steps", "1", "--output", str(out),
                 "--run-name", "run"]) == 0
    TRAINED["run"] = out / "run"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def fill(argv: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in argv]


def check(rc: int, err: str, out: str, row: Row, before: dict, tmp: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}: {err[-1500:]}"
    assert "Traceback" not in err + out, err[-1500:]
    assert len(lines) == 1, f"{len(lines)} lines: {err[-1500:]}"
    assert lines[0].startswith(f"masksub {row.argv[0]}: error: "), lines[0]
    for name in row.names:
        assert name.replace("{tmp}", str(tmp)) in lines[0], f"{name!r} not in: {lines[0]}"
    after = snapshot(tmp)
    assert after.keys() == before.keys(), f"left behind: {sorted(after.keys() - before.keys())}, " \
                                          f"gone: {sorted(before.keys() - after.keys())}"
    assert after == before, [k for k in after if after[k] != before[k]]


def test_table_has_the_rows_it_claims() -> None:
    assert len(ROWS) >= 60 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    if row.setup:
        row.setup(tmp_path)
    if row.patch:
        row.patch(monkeypatch)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        rc = main(fill(row.argv, tmp_path))
    except SystemExit as e:  # argparse's own refusals
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    check(rc, err, out, row, before, tmp_path)


SUB_ROWS = [r for r in ROWS if r.subprocess]


@pytest.mark.parametrize("row", SUB_ROWS, ids=[r.id for r in SUB_ROWS])
def test_bad_input_through_python_m(row: Row, tmp_path: Path) -> None:
    """The same rows through the installed entry point's module, in a fresh interpreter."""
    if row.setup:
        row.setup(tmp_path)
    before = snapshot(tmp_path)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "masksub.cli", *fill(row.argv, tmp_path)], env=env,
                       capture_output=True, text=True, timeout=300)
    check(p.returncode, p.stderr, p.stdout, row, before, tmp_path)
