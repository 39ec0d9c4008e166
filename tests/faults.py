"""Fault injection for the trainer's tests, from outside the product: patches on the engine's
own seams (``Trainer._update``, ``checkpoint._write``), in this process or, through
``fault_launcher.py``, in a subprocess started from environment variables."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from typing import Any

import torch

from masksub.train import checkpoint
from masksub.train.engine import Trainer

# the launcher's environment variables: comma-separated optimizer-update indices, or seconds
NAN_LOSS, NAN_GRAD, INF_UPDATE = "FAULT_NAN_LOSS_STEPS", "FAULT_NAN_GRAD_STEPS", "FAULT_INF_UPDATE_STEPS"
SLOW_CHECKPOINT, SLOW_ONLY = "FAULT_SLOW_CHECKPOINT", "FAULT_SLOW_CHECKPOINT_NAME"
KILL_RANK_AT = "FAULT_KILL_RANK_AT"  # "RANK:STEP": that rank SIGKILLs itself before that update
TEARDOWN_LOG = "FAULT_TEARDOWN_LOG"  # a folder: each rank writes what was alive when it left the group
SLOW_TEARDOWN = "FAULT_SLOW_TEARDOWN"  # seconds each rank waits before leaving the process group


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradient is not (a diverging run's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * float("nan")


def patch_steps(setattr_: Any, *, nan_loss: Iterable[int] = (), nan_grad: Iterable[int] = (),
                inf_update: Iterable[int] = (), kill_rank_at: tuple[int, int] | None = None) -> None:
    """Wrap ``Trainer._update``: at the given updates the loss is NaN, or its gradient is, or the
    update leaves an inf weight (one that overflowed); ``setattr_`` is ``monkeypatch.setattr``
    (undone after the test) or plain ``setattr`` (in a launched process)."""
    nan_loss, nan_grad, inf_update = set(nan_loss), set(nan_grad), set(inf_update)
    real_update = Trainer._update

    def _update(self: Trainer) -> Any:
        step = self.global_step
        if kill_rank_at is not None and (self.dist.rank, step) == kill_rank_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real = self.criterion
        if step in nan_loss:
            self.criterion = lambda logits, y: real(logits, y) * float("nan")
        elif step in nan_grad:
            self.criterion = lambda logits, y: real(_NanGrad.apply(logits), y)
        try:
            out = real_update(self)
        finally:
            self.criterion = real
        if step in inf_update and out is not None:
            with torch.no_grad():
                next(self.model_raw.parameters()).view(-1)[0] = float("inf")
        return out

    setattr_(Trainer, "_update", _update)


def patch_slow_checkpoint(setattr_: Any, seconds: float, only: str = "") -> None:
    """Every checkpoint write (or only those of the file named ``only``) stalls half-way, so a
    test can kill the writer mid-write."""
    real_write = checkpoint._write

    def _write(f: Any, data: memoryview) -> None:
        if only and not os.path.basename(f.name).startswith(f".{only}.tmp"):
            return real_write(f, data)
        half = len(data) // 2
        real_write(f, data[:half])
        f.flush()
        time.sleep(seconds)
        real_write(f, data[half:])

    setattr_(checkpoint, "_write", _write)


def patch_teardown_log(setattr_: Any, folder: str) -> None:
    """At each ``destroy_process_group``: how many DDP models are still alive (they hold the group;
    one freed later, at interpreter exit, can abort a finished gloo run)."""
    import gc
    import json

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    real = dist.destroy_process_group

    def destroy(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        live = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        with open(os.path.join(folder, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump({"live_ddp": live}, f)
        return real(*args, **kwargs)

    setattr_(dist, "destroy_process_group", destroy)


def patch_slow_teardown(setattr_: Any, seconds: float) -> None:
    """A process group that takes its time to go: long enough for a launcher to stop the process."""
    import time

    import torch.distributed as dist

    real = dist.destroy_process_group

    def destroy(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real(*args, **kwargs)

    setattr_(dist, "destroy_process_group", destroy)


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


def install_from_env() -> None:
    """The launcher's patches, read from the FAULT_* environment variables."""
    kill = os.environ.get(KILL_RANK_AT)
    patch_steps(setattr, nan_loss=_steps(NAN_LOSS), nan_grad=_steps(NAN_GRAD), inf_update=_steps(INF_UPDATE),
                kill_rank_at=tuple(int(v) for v in kill.split(":")) if kill else None)
    if os.environ.get(TEARDOWN_LOG):
        patch_teardown_log(setattr, os.environ[TEARDOWN_LOG])
    if os.environ.get(SLOW_TEARDOWN):
        patch_slow_teardown(setattr, float(os.environ[SLOW_TEARDOWN]))
    if os.environ.get(SLOW_CHECKPOINT):
        patch_slow_checkpoint(setattr, float(os.environ[SLOW_CHECKPOINT]), os.environ.get(SLOW_ONLY, ""))
