"""torchrun support: process group from the environment, DDP, metric reduction, rank-0 writes."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import MaskSubError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def check_device(pref: str) -> None:
    """A device this machine has, or a message saying which it has (not a traceback)."""
    if pref == "auto":
        return
    try:
        dev = torch.device(pref)
    except (RuntimeError, TypeError):
        raise MaskSubError(f"device {pref!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise MaskSubError(f"device {pref!r}: this machine has no usable CUDA GPU; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise MaskSubError(f"device {pref!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise MaskSubError(f"device {pref!r}: MPS is not available here; use --device cpu (or auto)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise MaskSubError(f"device {pref!r}: masksub trains on cpu, cuda or mps")


def setup(device_pref: str = "auto") -> tuple[Dist, torch.device]:
    """Read torchrun's environment; gloo on CPU, NCCL on CUDA. One process: no group at all."""
    check_device(device_pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device_pref = "cuda" if torch.cuda.is_available() else "cpu"
    if device_pref.startswith("cuda"):
        device = torch.device("cuda", local) if world > 1 else torch.device(device_pref)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_pref)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def teardown(finished: bool = False) -> None:
    """Leave the process group while the interpreter is whole. After a finished run every rank
    waits for the others first, and what still holds the group (a DDP reducer) is collected before
    it goes: a gloo group freed at interpreter exit instead can abort a run that has finished
    ("terminate called without an active exception")."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        try:
            dist.barrier()
        except RuntimeError:  # a peer already gone: nothing to wait for
            pass
    gc.collect()
    dist.destroy_process_group()


def all_sum(t: Tensor, d: Dist) -> Tensor:
    """Sum over ranks (a no-op with one process)."""
    if d.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_flag(flag: bool | Tensor, d: Dist, device: torch.device) -> bool:
    """True if any rank says so: every rank must stop (or save) at the same step.

    A 0-d tensor flag is reduced on the device, so reading the result is the one host sync.
    """
    if not d.enabled:
        return bool(flag)
    if isinstance(flag, Tensor):
        t = flag.detach().reshape(1).to(device=device, dtype=torch.float32)
    else:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def any_flags(flags: Tensor, d: Dist, device: torch.device) -> list[bool]:
    """Several flags at once, each True if any rank raised it: one reduction, one host sync."""
    t = flags.detach().reshape(-1).to(device=device, dtype=torch.float32)
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
