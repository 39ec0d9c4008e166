"""When and what the trainer writes: never a checkpoint with non-finite state, ``best.pt``
before the ``last.pt`` that names it, and a message that says which checkpoint is intact.

A kill at any moment leaves ``last.pt`` naming a best epoch whose ``best.pt`` is on disk (a
``best.pt`` newer than ``last.pt`` is rewritten by the resumed run's replay of that epoch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError
from . import checkpoint as ckpt_mod
from . import distributed as D


class TrainingStopped(MaskSubError):
    """The run stopped on purpose (non-finite values, a lost process); the message says which
    checkpoint is intact."""

    reported = False

    def report(self) -> None:
        """Say it once, flushed: where it is raised when the launcher may stop the process before
        the CLI would, and again by the CLI without repeating it."""
        if not self.reported:
            print(f"masksub train: stopped: {self}", file=sys.stderr, flush=True)
            self.reported = True


class Saver:
    """Writes the run's checkpoints (every rank calls it: FSDP ranks write their shards, the
    non-finite check is collective); remembers the step of the last good ``last.pt``."""

    def __init__(self, run_dir: Path, dist: D.Dist, device: torch.device, fsdp: Any,
                 model: nn.Module, optimizer: Any, saved_step: int | None) -> None:
        self.run_dir, self.dist, self.device, self.fsdp = run_dir, dist, device, fsdp
        self.model, self.optimizer = model, optimizer
        self.saved_step = saved_step

    def save(self, state: dict[str, Any], name: str = "last.pt") -> Path | None:
        """Write a checkpoint, never one with non-finite weights or optimizer state (that stops the
        run and leaves the last good one); a failed write (full disk) leaves the previous one too."""
        bad = nonfinite_tensors(self.fsdp.local_view(state) if self.fsdp is not None else state)
        if D.any_flag(bool(bad), self.dist, self.device):
            raise TrainingStopped(
                f"the model weights or optimizer state are not finite after step {state['global_step'] - 1} "
                f"(e.g. {', '.join(bad[:3]) or 'on another rank'}); no checkpoint was written: "
                f"{self.intact()}. Lower lr, raise warmup_epochs, set clip_grad, or use bf16 instead of fp16")
        path: Path | None = None
        if self.fsdp is not None:  # every rank writes its shards
            path = self.fsdp.save(self.run_dir, name, state, self.model, self.optimizer, self.dist.main)
        elif self.dist.main:  # the others know its step too: any rank may have to say which is intact
            try:
                path = ckpt_mod.save(self.run_dir / name, state)
            except OSError as e:
                raise MaskSubError(
                    f"cannot write checkpoint {self.run_dir / name} ({e.strerror or e}); {self.intact()}. "
                    f"Free space (or move the run), then continue with: masksub train --resume {self.run_dir}"
                ) from None
        if name == "last.pt":
            self.saved_step = state["global_step"]
        return path

    def save_epoch_end(self, state: dict[str, Any], *, is_best: bool, scored: str) -> None:
        """The epoch's checkpoint: ``best.pt`` first (marked with the weights that scored), then the
        ``last.pt`` that records it."""
        if is_best:
            self.save({**state, "eval_weights": scored}, "best.pt")
        self.save(state)

    def best_is_missing(self, best_epoch: int, epoch: int) -> bool:
        """True if ``best.pt`` is absent or holds an older epoch than ``best_epoch``, the best that
        ``last.pt`` (at ``epoch``) names. A newer one (written before a ``last.pt`` that a kill
        prevented) is kept: the resumed run replays that epoch and writes it again. Asked by every
        rank, answered by rank 0's look at the disk."""
        missing = False
        if self.dist.main and best_epoch > 0:
            try:
                held = ckpt_mod.load(self.run_dir / "best.pt").get("best_epoch", -1)
                missing = held != best_epoch and held <= epoch
            except MaskSubError:
                missing = True
        return D.any_flag(missing, self.dist, self.device)

    def intact(self) -> str:
        """Where the last good checkpoint is, said truthfully."""
        if self.saved_step is None:
            return "this run has no checkpoint yet"
        return f"{self.run_dir / 'last.pt'} is intact, from step {self.saved_step}"


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating tensors in the model, EMA and optimizer state that are not finite:
    one reduction on the device, one host sync per checkpoint."""
    named: list[tuple[str, Tensor]] = []
    for part in ("model", "ema"):
        for k, v in (state.get(part) or {}).items():
            if isinstance(v, Tensor) and v.is_floating_point():
                named.append((f"{part}.{k}", v))
    for i, st in (state.get("optimizer") or {}).get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, Tensor) and v.is_floating_point():
                named.append((f"optimizer.state.{i}.{k}", v))
    if not named:
        return []
    ok = torch.stack([torch.isfinite(v).all().to(named[0][1].device) for _, v in named])
    if bool(ok.all()):
        return []
    return [n for (n, _), good in zip(named, ok.tolist(), strict=True) if not good]
