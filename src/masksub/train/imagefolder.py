"""ImageFolder trees for the trainer: one class map for every split, no symlink loops, and
subsets that are a seeded, class-balanced sample rather than the first files.

timm's folder reader builds a class map per folder it reads: a validation folder that lacks
one of the training classes would number its classes differently, and every image of the
classes after the gap would be scored against the wrong label. Here the training split's
folders define the indices; the other splits are read with that map, and a class the training
split does not have is refused. The samples reach timm's ``ImageDataset`` through its reader
slot (a ``timm.data.readers.reader.Reader``), so loading and transforms stay timm's.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.data.readers.reader import Reader

from ..errors import MaskSubError


@dataclass
class Scan:
    """The image files under one split folder: (path, class name) sorted as timm sorts them,
    and the symlinked folders that were not followed because they lead back up the tree."""

    root: Path
    samples: list[tuple[str, str]]
    loops: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        from timm.utils.misc import natural_key

        return sorted({c for _, c in self.samples}, key=natural_key)


def scan(folder: Path) -> Scan:
    """Every image under ``folder``, labelled by its leaf folder's name (timm's rule), following
    symlinks but never one that leads back to a folder of the path it is on (a loop would list
    the same images again and again)."""
    from timm.data.readers.img_extensions import get_img_extensions
    from timm.utils.misc import natural_key

    types = get_img_extensions(as_set=True)
    top = os.fspath(folder)
    chains: dict[str, tuple[str, ...]] = {top: (os.path.realpath(top),)}
    samples: list[tuple[str, str]] = []
    loops: list[str] = []
    for root, subdirs, files in os.walk(top, topdown=True, followlinks=True):
        chain = chains.pop(root, ())
        keep = []
        for d in sorted(subdirs):
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            if real in chain:
                loops.append(os.path.relpath(path, top))
                continue
            chains[path] = (*chain, real)
            keep.append(d)
        subdirs[:] = keep
        label = os.path.basename(os.path.relpath(root, top)) if root != top else ""
        samples.extend((os.path.join(root, f), label) for f in files if os.path.splitext(f)[1].lower() in types)
    samples.sort(key=lambda s: natural_key(s[0]))
    return Scan(Path(folder), samples, loops)


class FolderReader(Reader):
    """timm reader over a fixed list of (path, class index): what ``ImageDataset(reader=...)`` reads."""

    def __init__(self, root: Path, samples: list[tuple[str, int]]) -> None:
        super().__init__()
        self.root, self.samples = os.fspath(root), samples

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        return open(path, "rb"), target  # noqa: SIM115 - timm's ImageDataset reads and closes it

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        name = self.samples[index][0]
        if basename:
            return os.path.basename(name)
        return name if absolute else os.path.relpath(name, self.root)


def find_split(root: Path, split: str) -> Path | None:
    """The folder of ``split`` (or of one of timm's synonyms: val / validation / eval, train / training)."""
    from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM

    name = split.split("[")[0]
    synonyms = _TRAIN_SYNONYM if name in _TRAIN_SYNONYM else _EVAL_SYNONYM if name in _EVAL_SYNONYM else {}
    for cand in (name, *synonyms):
        if (root / cand).is_dir():
            return root / cand
    return None


def split_folders(root: Path, train_split: str, val_split: str, *, for_eval: bool = False) -> tuple[Path, Path]:
    """(train folder, validation folder). timm falls back to the root for a split folder it cannot
    find, so a tree without a validation folder would be validated on its training images: refused.
    Evaluation reads the training folder only for its class map, so there one folder may be both."""
    tr, va = find_split(root, train_split), find_split(root, val_split)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if tr is None:
        if for_eval:
            hint = (f"; if {va.name}/ holds every class the model was trained on, "
                    f"add --set train_split={va.name}") if va is not None else ""
            raise MaskSubError(
                f"ImageFolder root {root} has no training folder {train_split!r} (found {folders}): the class "
                "indices come from the training split's folders, as in training. Give the folder the model was "
                f"trained on{hint}")
        raise MaskSubError(f"ImageFolder root {root} has no {train_split!r} folder (found {folders}); give the "
                           "training folder with --set train_split=NAME")
    if va is None:
        raise MaskSubError(
            f"ImageFolder root {root} has no validation folder ({val_split!r}, val, validation, ...; found "
            f"{folders}): validation would run on the training images. Give one with --set val_split=NAME")
    if va == tr and not for_eval:
        raise MaskSubError(
            f"train_split={train_split!r} and val_split={val_split!r} both name {tr}: validation would run on "
            "the training images. Give another validation folder with --set val_split=NAME")
    return tr, va


def class_map(train: Scan) -> dict[str, int]:
    """The training split's classes in timm's order: one map for every split."""
    return {c: i for i, c in enumerate(train.classes)}


def labelled(split: Scan, classes: dict[str, int], train_root: Path) -> list[tuple[str, int]]:
    """``split``'s samples with the training split's class indices; a class the training split
    lacks has no index and is refused by name."""
    extra = [c for c in split.classes if c not in classes]
    if extra:
        shown = ", ".join(repr(c) for c in extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise MaskSubError(
            f"{split.root} has class folder(s) {shown} that the training folder {train_root} lacks: every split "
            "takes the training split's class indices, so these images have no label. Remove them, or add the "
            "class to the training folder")
    return [(p, classes[c]) for p, c in split.samples]


def check_num_classes(classes: dict[str, int], num_classes: int, train_root: Path, what: str = "num_classes") -> None:
    """More class folders than outputs: the labels past the head would fail mid-epoch."""
    if len(classes) > num_classes:
        names = list(classes)
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise MaskSubError(
            f"{train_root} has {len(classes)} class folders ({shown}) but {what} is {num_classes}: labels "
            f"{num_classes}..{len(classes) - 1} have no output. Set num_classes={len(classes)} "
            "(--set num_classes=...), or remove the extra folders")


def subset_indices(n: int, k: int, seed: int, targets: list[int] | None = None) -> list[int]:
    """``k`` of ``n`` sample indices, drawn with ``seed`` alone (the same on every rank and on
    resume), in ascending order. With ``targets``, class-balanced: every class gets an equal share,
    a class with fewer samples all of them and the rest spread over the others."""
    if k >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed))
    if targets is None:
        return sorted(torch.randperm(n, generator=g)[:k].tolist())
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_class[int(t)].append(i)
    classes = sorted(by_class, key=lambda c: (len(by_class[c]), c))  # smallest first: water-filling
    chosen: list[int] = []
    left = k
    for j, c in enumerate(classes):
        share = min(len(by_class[c]), left // (len(classes) - j))
        members = torch.tensor(by_class[c])
        chosen += members[torch.randperm(len(members), generator=g)[:share]].tolist()
        left -= share
    return sorted(chosen)
