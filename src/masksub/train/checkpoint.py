"""Checkpoints that survive preemption: written to a temp file, fsynced, then ``os.replace``d.

A reader refuses, with a message, a file that is truncated or not a checkpoint, one written by
a format version this masksub cannot read, or one whose model does not match the run's.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MaskSubError

FORMAT = "masksub-checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "cached": float(st[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x


def model_signature(model: nn.Module) -> list[list[Any]]:
    """Names and shapes of the state dict: what makes two checkpoints the same model."""
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable
    return path


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries, so a rename in it survives a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write(f: Any, data: memoryview) -> None:
    """The bytes into the open temporary file: where a full disk (or a kill) interrupts a write."""
    f.write(data)


def load(path: str | Path, *, map_location: Any = "cpu", require: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read and check a checkpoint; every way it can be unusable is a MaskSubError (``require``:
    keys the caller needs, e.g. ``("config", "model")`` to train or evaluate)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise MaskSubError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise MaskSubError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}); it is truncated "
            "or not a masksub checkpoint. Resume from another one (best.pt, or an earlier copy)"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MaskSubError(f"{path} is not a masksub checkpoint (no '{FORMAT}' marker)")
    version = ckpt.get("version")
    if version != VERSION:
        raise MaskSubError(
            f"checkpoint {path} has format version {version!r}; this masksub reads version {VERSION}. "
            "Use the masksub release that wrote it"
        )
    # a dist=fsdp checkpoint names the directory of its sharded model and optimizer state
    missing = [k for k in require if k not in ckpt and not (k == "model" and ckpt.get("sharded"))]
    if missing:
        raise MaskSubError(
            f"checkpoint {path} has no {' or '.join(repr(k) for k in missing)}: it was not written by "
            "masksub train (or was edited); use a run's last.pt or best.pt"
        )
    return ckpt


def check_model(ckpt: dict[str, Any], model: nn.Module, model_name: str, path: str | Path = "") -> None:
    """Refuse a checkpoint of another model before anything is loaded into this one."""
    saved = ckpt.get("model_name")
    sig = model_signature(model)
    if saved != model_name or ckpt.get("signature") != sig:
        have = {k: s for k, s in sig}
        diff = [k for k, s in ckpt.get("signature", []) if have.get(k) != s][:3]
        missing = [k for k in have if k not in {k2 for k2, _ in ckpt.get("signature", [])}][:3]
        raise MaskSubError(
            f"checkpoint {path} is of another model ({saved!r}, this run builds {model_name!r}; "
            f"differing tensors e.g. {diff or missing}). Resume with the config it was written with"
        )


def export_weights(model: nn.Module, path: str | Path) -> Path:
    """The model's weights alone, as a plain state dict on the CPU, written atomically: what
    ``torch.load`` + ``load_state_dict`` (or a recipe's ``pretrained_file``) reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
