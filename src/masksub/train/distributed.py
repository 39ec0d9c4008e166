"""torchrun support: process group from the environment, DDP, metric reduction, rank-0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


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


def setup(device_pref: str = "auto") -> tuple[Dist, torch.device]:
    """Read torchrun's environment; gloo on CPU, NCCL on CUDA. One process: no group at all."""
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


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
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
