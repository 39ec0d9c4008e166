"""Data for the trainer: in-memory tensors (Fashion-MNIST, synthetic) or timm's dataset factory.

Small data sets live as one uint8 tensor on the training device and are cropped and flipped
there a batch at a time: a DataLoader over 60k 28x28 images would starve a GPU. Larger ones go
through ``timm.data.create_dataset`` + ``create_transform`` and a DataLoader. Both take the
batch order from (seed, epoch) alone and can start mid-epoch, which is what makes ``--resume``
exact; under torchrun each rank gets its own shard.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import MaskSubError
from .config import Config
from .sampler import epoch_generator, repeated_order

FMNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, rank: int, world: int,
                repeats: int = 0) -> Tensor:
    """This rank's sample indices for one epoch, from (seed, epoch) only; ``repeats`` >= 2 is
    repeated augmentation (``sampler.repeated_order``)."""
    if shuffle and repeats >= 2:
        return repeated_order(n, seed, epoch, repeats, rank, world)
    if shuffle:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch))
    else:
        order = torch.arange(n)
    if world > 1:
        if shuffle:  # equal shards so every rank runs the same number of steps
            order = order[: (n // world) * world] if n >= world else order.repeat(world)[:world]
        order = order[rank::world]
    return order


def _n_batches(n: int, batch: int, drop_last: bool) -> int:
    if drop_last and n >= batch:
        return n // batch
    return math.ceil(n / batch)


class TensorData:
    """A whole data set as one uint8 NCHW tensor on the device; crop+flip done on the batch."""

    def __init__(self, images: Tensor, labels: Tensor, *, mean: tuple, std: tuple, batch_size: int,
                 train: bool, seed: int, rank: int = 0, world: int = 1, crop_pad: int = 0,
                 hflip: float = 0.0, device: torch.device | str = "cpu", channels_last: bool = False,
                 img_size: int | None = None, repeats: int = 0) -> None:
        self.images = images.to(device)
        self.repeats = repeats
        self.labels = labels.to(device)
        self.device = torch.device(device)
        c = images.shape[1]
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, c, 1, 1) * 255
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world = rank, world
        self.crop_pad, self.hflip = crop_pad, hflip
        self.channels_last = channels_last
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, epoch: int = 0) -> int:
        n = len(epoch_order(len(self), self.seed, epoch, self.train, self.rank, self.world, self.repeats))
        return _n_batches(n, self.batch_size, self.train)

    def _prep(self, x: Tensor, augment: bool) -> Tensor:
        x = x.float()
        if augment and self.crop_pad:
            x = random_crop(x, self.crop_pad)
        if augment and self.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < self.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = (x - self.mean) / self.std
        if self.img_size and x.shape[-1] != self.img_size:
            x = torch.nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                                                align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(len(self), self.seed, epoch, self.train, self.rank, self.world, self.repeats).to(self.device)
        nb = _n_batches(len(order), self.batch_size, self.train)
        for b in range(start, nb):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self._prep(self.images[idx], self.train), self.labels[idx]

    def plain(self, n: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The first ``n`` samples, no augmentation, this rank's shard (for the loss analysis)."""
        idx_all = torch.arange(min(n, len(self)))[self.rank::self.world].to(self.device)
        for i in range(0, len(idx_all), self.batch_size):
            idx = idx_all[i:i + self.batch_size]
            yield self._prep(self.images[idx], False), self.labels[idx]


def random_crop(x: Tensor, pad: int) -> Tensor:
    """Per-image random crop of a zero-padded batch (the classic pad+crop), without a loop."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return xp.gather(3, cols)


def _to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    """A loader batch onto the training device (asynchronously from pinned memory)."""
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


class LoaderData:
    """A timm dataset behind a DataLoader whose order comes from (seed, epoch) and can skip ahead."""

    def __init__(self, dataset: Any, *, batch_size: int, train: bool, seed: int, rank: int, world: int,
                 workers: int, device: torch.device, channels_last: bool = False,
                 plain_dataset: Any = None, repeats: int = 0) -> None:
        self.dataset, self.plain_dataset = dataset, plain_dataset
        self.repeats = repeats
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world, self.workers = rank, world, workers
        self.device, self.channels_last = device, channels_last

    def __len__(self) -> int:
        return len(self.dataset)

    def num_batches(self, epoch: int = 0) -> int:
        n = len(epoch_order(len(self), self.seed, epoch, self.train, self.rank, self.world, self.repeats))
        return _n_batches(n, self.batch_size, self.train)

    def _loader(self, dataset: Any, indices: list[int], epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        from torch.utils.data import DataLoader

        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch * 31 + self.rank)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=g,
                            persistent_workers=False)
        for x, y in loader:
            yield _to_device(x, y, self.device, self.channels_last)

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(len(self), self.seed, epoch, self.train, self.rank, self.world, self.repeats).tolist()
        nb = self.num_batches(epoch)
        order = order[start * self.batch_size: nb * self.batch_size]
        return self._loader(self.dataset, order, epoch)

    def plain(self, n: int) -> Iterator[tuple[Tensor, Tensor]]:
        ds = self.plain_dataset or self.dataset
        idx = list(range(min(n, len(ds))))[self.rank::self.world]
        return self._loader(ds, idx, 0)


class StreamData:
    """A streaming timm dataset (webdataset shards, streaming HF): the reader shards by rank and
    shuffles by epoch; ``start`` skips batches, so a resume is exact only if the reader is."""

    def __init__(self, dataset: Any, *, batch_size: int, train: bool, workers: int, device: torch.device,
                 channels_last: bool = False) -> None:
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.workers, self.device, self.channels_last = workers, device, channels_last

    def num_batches(self, epoch: int = 0) -> int:
        try:
            n = len(self.dataset)
        except TypeError:
            raise MaskSubError("a streaming data set needs its size: pass num_samples via the "
                               "timm reader (e.g. a wds _info.json)") from None
        return _n_batches(n, self.batch_size, self.train)

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        from torch.utils.data import DataLoader

        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                            drop_last=self.train, pin_memory=self.device.type == "cuda")
        nb = self.num_batches(epoch)
        for i, (x, y) in enumerate(loader):
            if i >= nb:
                break
            if i >= start:
                yield _to_device(x, y, self.device, self.channels_last)

    def plain(self, n: int) -> Iterator[tuple[Tensor, Tensor]]:
        seen = 0
        for x, y in self.iterate(0, 0):
            if seen >= n:
                break
            seen += len(y)
            yield x, y


# -- sources ----------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped), checked: a truncated or empty copy is refused by name, not read short."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise MaskSubError(f"{path} cannot be read as a gzipped IDX file ({type(e).__name__}: {e}); it is "
                           "truncated or damaged. Copy it again, or drop data_dir to use the Debian copy") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise MaskSubError(f"{path} is not a uint8 IDX file ({len(data)} bytes after gunzip, header "
                           f"{data[:4].hex() or 'empty'}); copy it again")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    need = 4 + 4 * ndim + math.prod(dims)
    if len(data) != need:
        raise MaskSubError(f"{path} holds {len(data)} bytes, its header {dims} needs {need}: the file is "
                           "truncated. Copy it again")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, data_dir: str = "") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as (uint8 N,1,28,28, int64 N): the IDX files in ``data_dir`` when given (else
    Debian's), then torchvision. A ``data_dir`` that does not exist is refused, not replaced by
    another copy."""
    images_f, labels_f = FMNIST_FILES[split]
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise MaskSubError(f"data_dir {data_dir} does not exist (or is not a folder); give the folder with the "
                           "Fashion-MNIST .gz files, or drop data_dir to use the Debian package's copy")
    dirs = [data_dir, os.path.join(data_dir, "FashionMNIST", "raw")] if data_dir else list(FMNIST_DIRS)
    for d in dirs:
        root = Path(d).expanduser()
        if (root / images_f).is_file() and (root / labels_f).is_file():
            x = torch.from_numpy(_read_idx(root / images_f).copy()).unsqueeze(1)
            y = torch.from_numpy(_read_idx(root / labels_f).astype(np.int64))
            if x.ndim != 4 or x.shape[2:] != (28, 28) or len(x) != len(y):
                raise MaskSubError(f"{root}: {images_f} holds {tuple(x.shape)} images and {labels_f} {len(y)} "
                                   "labels; they are not a matching Fashion-MNIST pair")
            return x, y
    try:
        from torchvision.datasets import FashionMNIST

        root = data_dir or os.path.expanduser("~/.cache/masksub/fashion-mnist")
        ds = FashionMNIST(root, train=split == "train", download=True)
        return ds.data.unsqueeze(1).clone(), ds.targets.clone()
    except Exception as e:  # noqa: BLE001 - any failure means: no data
        where = f"{data_dir} has no {images_f} / {labels_f}; " if data_dir else ""
        raise MaskSubError(
            f"Fashion-MNIST not found: {where}install the Debian package dataset-fashion-mnist "
            f"(sudo apt-get install dataset-fashion-mnist), or go online so torchvision can fetch it ({e})"
        ) from None


def synthetic(cfg: Config, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random images whose mean brightness per channel depends on the label (learnable, tiny)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    x = torch.randint(0, 128, (n, cfg.in_chans, cfg.img_size, cfg.img_size), generator=g)
    x = x + (y * (127 // max(cfg.num_classes - 1, 1))).view(-1, 1, 1, 1)
    return x.to(torch.uint8), y


def three_augment(cfg: Config, mean: tuple, std: tuple) -> Any:
    """DeiT-III's 3-Augment (augsub ``deit/augment.py`` ``new_data_aug_generator``).

    ``aug: 3aug``: RandomResizedCrop (scale 0.08-1, bicubic) + flip; ``aug: 3aug_src`` (the
    source's ``--src``): Resize + RandomCrop(pad 4, reflect) + flip. Then one of grayscale /
    solarize / Gaussian blur (radius 0.1-2), colour jitter, normalise.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    if cfg.aug == "3aug_src":
        primary = [T.Resize(cfg.img_size, interpolation=T.InterpolationMode.BICUBIC),
                   T.RandomCrop(cfg.img_size, padding=4, padding_mode="reflect")]
    else:
        primary = [RandomResizedCropAndInterpolation(cfg.img_size, scale=(0.08, 1.0),
                                                     interpolation=cfg.train_interpolation or cfg.interpolation)]
    ops = primary + [
        T.RandomHorizontalFlip(cfg.hflip),
        T.RandomChoice([T.Grayscale(3 if cfg.in_chans == 3 else 1), _Solarize(), _PilBlur()]),
    ]
    if cfg.color_jitter:
        ops.append(T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


class _Solarize:
    """``ImageOps.solarize`` at its default threshold 128, as augment.py's ``Solarization(p=1)``."""

    def __call__(self, img: Any) -> Any:
        from PIL import ImageOps

        return ImageOps.solarize(img)


class _PilBlur:
    """PIL Gaussian blur, radius uniform in [0.1, 2] (augment.py's ``GaussianBlur(p=1)``)."""

    def __call__(self, img: Any) -> Any:
        import random

        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def norm_stats(cfg: Config) -> tuple[tuple, tuple]:
    if cfg.mean and cfg.std:
        return tuple(cfg.mean), tuple(cfg.std)
    if cfg.data == "fashion-mnist":
        return FMNIST_MEAN, FMNIST_STD
    if cfg.in_chans == 1:
        return (0.5,), (0.5,)
    return IMAGENET_MEAN, IMAGENET_STD


def build_transforms(cfg: Config) -> tuple[Any, Any]:
    """(train, eval) transforms for the timm path, from timm's ``create_transform``."""
    from timm.data import create_transform

    mean, std = norm_stats(cfg)
    size = (cfg.in_chans, cfg.img_size, cfg.img_size)
    common = dict(input_size=size, interpolation=cfg.interpolation, mean=mean, std=std)
    if cfg.aug in ("3aug", "3aug_src"):
        train_tf = three_augment(cfg, mean, std)
    else:
        train_tf = create_transform(
            **(common | {"interpolation": cfg.train_interpolation or cfg.interpolation}),
            is_training=True, no_aug=cfg.aug == "none", hflip=cfg.hflip,
            color_jitter=cfg.color_jitter or 0.0, auto_augment=cfg.auto_augment, re_prob=cfg.reprob,
            re_mode=cfg.re_mode, re_count=cfg.re_count,  # the sources' erasing: per-pixel noise
        )
    eval_tf = create_transform(**common, is_training=False, crop_pct=cfg.crop_pct)
    return train_tf, eval_tf


def build_data(cfg: Config, *, device: torch.device, rank: int = 0, world: int = 1,
               eval_only: bool = False) -> tuple[Any, Any]:
    """(train, val) data objects with ``num_batches(epoch)``, ``iterate(epoch, start)``, ``plain(n)``;
    ``eval_only``: (None, val), the training split read only for an ImageFolder's class map."""
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    if cfg.data in ("synthetic", "fashion-mnist"):
        if cfg.data == "synthetic":
            tr = synthetic(cfg, cfg.synthetic_size, 1234)
            va = synthetic(cfg, cfg.synthetic_val_size, 4321)
        else:
            if cfg.in_chans != 1:
                raise MaskSubError(f"Fashion-MNIST is grey-scale: set in_chans=1 (got {cfg.in_chans})")
            if cfg.num_classes != 10:
                raise MaskSubError(f"Fashion-MNIST has 10 classes: set num_classes=10 (got {cfg.num_classes})")
            va = fashion_mnist("test", cfg.data_dir)
            tr = va if eval_only else fashion_mnist("train", cfg.data_dir)
        if cfg.subset:
            tr = (tr[0][: cfg.subset], tr[1][: cfg.subset])
        if cfg.val_subset:
            va = (va[0][: cfg.val_subset], va[1][: cfg.val_subset])
        mean, std = norm_stats(cfg)
        aug = cfg.aug in ("crop_flip", "timm", "3aug", "3aug_src")
        common = dict(mean=mean, std=std, seed=cfg.seed, rank=rank, world=world, device=device,
                      channels_last=cfg.channels_last, img_size=cfg.img_size)
        train = TensorData(*tr, batch_size=cfg.batch_size, train=True, repeats=cfg.repeated_aug,
                           crop_pad=cfg.crop_pad if aug else 0, hflip=cfg.hflip if aug else 0.0, **common)
        val = TensorData(*va, batch_size=eval_bs, train=False, **common)
        return (None if eval_only else train), val

    from timm.data import create_dataset

    train_tf, eval_tf = build_transforms(cfg)
    name, root = ("", cfg.data) if not cfg.data.startswith(("hfds/", "hfids/", "wds/", "tfds/")) else (cfg.data, cfg.data_dir)
    common = dict(seed=cfg.seed, rank=rank, world=world, workers=cfg.workers, device=device,
                  channels_last=cfg.channels_last)
    if name == "":
        root_p = Path(root).expanduser()
        if not root_p.is_dir():
            raise MaskSubError(f"data path {root} is not a directory (an ImageFolder root)")
        train_ds, val_ds, plain_ds = _imagefolder(cfg, root_p, train_tf, eval_tf, eval_only=eval_only, rank=rank)
        val = LoaderData(val_ds, batch_size=eval_bs, train=False, **common)
        if eval_only:
            return None, val
        return LoaderData(train_ds, batch_size=cfg.batch_size, train=True, plain_dataset=plain_ds,
                          repeats=cfg.repeated_aug, **common), val
    try:
        kw = dict(root=root, search_split=True, input_img_mode="L" if cfg.in_chans == 1 else "RGB",
                  batch_size=cfg.batch_size, seed=cfg.seed)
        train_ds = create_dataset(name, split=cfg.train_split, is_training=True, **kw)
        val_ds = create_dataset(name, split=cfg.val_split, is_training=False, **kw)
        plain_ds = create_dataset(name, split=cfg.train_split, is_training=False, **kw)
    except (FileNotFoundError, RuntimeError, AssertionError, ValueError) as e:
        raise MaskSubError(f"cannot read data set {cfg.data!r}: {e}") from None
    train_ds.transform, val_ds.transform, plain_ds.transform = train_tf, eval_tf, eval_tf
    if isinstance(train_ds, torch.utils.data.IterableDataset):
        if cfg.repeated_aug:
            raise MaskSubError("repeated_aug needs an indexable data set (an ImageFolder or hfds/...), "
                               f"not the stream {cfg.data!r}; set repeated_aug=0")
        common = dict(workers=cfg.workers, device=device, channels_last=cfg.channels_last)
        return (StreamData(train_ds, batch_size=cfg.batch_size, train=True, **common),
                StreamData(val_ds, batch_size=eval_bs, train=False, **common))
    from torch.utils.data import Subset

    from .imagefolder import subset_indices

    if cfg.subset:  # a seeded random sample, not the first rows (often sorted by class)
        train_ds = Subset(train_ds, subset_indices(len(train_ds), cfg.subset, cfg.subset_seed))
    if cfg.val_subset:
        val_ds = Subset(val_ds, subset_indices(len(val_ds), cfg.val_subset, cfg.subset_seed))
    train = LoaderData(train_ds, batch_size=cfg.batch_size, train=True, plain_dataset=plain_ds,
                       repeats=cfg.repeated_aug, **common)
    val = LoaderData(val_ds, batch_size=eval_bs, train=False, **common)
    return train, val


def _imagefolder(cfg: Config, root: Path, train_tf: Any, eval_tf: Any, *, eval_only: bool,
                 rank: int) -> tuple[Any, Any, Any]:
    """(train, val, plain) timm ``ImageDataset``s of an ImageFolder tree, all with the training
    split's class map; ``subset`` / ``val_subset`` / the analysis images are seeded, class-balanced
    samples (``subset_seed``), the same on every rank and on resume."""
    import sys

    from timm.data import ImageDataset

    from . import imagefolder as F

    tr_dir, va_dir = F.split_folders(root, cfg.train_split, cfg.val_split, for_eval=eval_only)
    scans = {tr_dir: F.scan(tr_dir)}
    scans[va_dir] = scans.get(va_dir) or F.scan(va_dir)
    for folder, sc in scans.items():
        if not sc.samples:
            raise MaskSubError(f"ImageFolder split {folder} holds no images (looked for "
                               f"{', '.join(sorted(_img_extensions()))} files in its class folders)")
        if sc.loops and rank == 0:
            print(f"masksub: note: {len(sc.loops)} symlinked folder(s) under {folder} lead back up the tree "
                  f"and were not followed (e.g. {sc.loops[0]})", file=sys.stderr)
    classes = F.class_map(scans[tr_dir])
    F.check_num_classes(classes, cfg.num_classes, tr_dir,
                        "the checkpoint's num_classes" if eval_only else "num_classes")
    mode = "L" if cfg.in_chans == 1 else "RGB"

    def dataset(samples: list[tuple[str, int]], folder: Path, tf: Any, k: int) -> Any:
        if k:
            samples = [samples[i] for i in F.subset_indices(len(samples), k, cfg.subset_seed,
                                                            [t for _, t in samples])]
        return ImageDataset(str(folder), reader=F.FolderReader(folder, samples), input_img_mode=mode, transform=tf)

    val_ds = dataset(F.labelled(scans[va_dir], classes, tr_dir), va_dir, eval_tf, cfg.val_subset)
    if eval_only:
        return None, val_ds, None
    train_samples = F.labelled(scans[tr_dir], classes, tr_dir)
    train_ds = dataset(train_samples, tr_dir, train_tf, cfg.subset)
    plain_ds = dataset(train_ds.reader.samples, tr_dir, eval_tf, cfg.analysis_subset)
    return train_ds, val_ds, plain_ds


def _img_extensions() -> set[str]:
    from timm.data.readers.img_extensions import get_img_extensions

    return get_img_extensions(as_set=True)
