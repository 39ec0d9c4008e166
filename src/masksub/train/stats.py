"""What one optimizer update measured, and the running sums the epoch and log lines are made of.

The sums stay on the device (no host sync per step); a new metric is one field here and the
line that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class StepStats:
    """One finished update: mean losses over its micro-batches, per-branch gradient norms
    (only on the analysis steps), images seen by this rank."""

    loss_main: Tensor
    loss_sub: Tensor
    grad_norm_main: Tensor | None = None
    grad_norm_sub: Tensor | None = None
    images: int = 0


def _zero() -> Tensor:
    return torch.zeros(())


@dataclass
class Sums:
    """Sums over updates (an epoch, or the window since the last step line); ``n`` counts the
    updates that trained, ``skipped`` those that did not (non-finite)."""

    loss_main: Tensor = field(default_factory=_zero)
    loss_sub: Tensor = field(default_factory=_zero)
    n: int = 0
    gn_main: Tensor = field(default_factory=_zero)
    gn_sub: Tensor = field(default_factory=_zero)
    gn_n: int = 0
    skipped: int = 0
    images: int = 0
    time_s: float = 0.0

    @classmethod
    def zeros(cls, device: torch.device) -> Sums:
        z = torch.zeros((), device=device)
        return cls(loss_main=z.clone(), loss_sub=z.clone(), gn_main=z.clone(), gn_sub=z.clone())

    def add(self, s: StepStats) -> None:
        self.loss_main += s.loss_main
        self.loss_sub += s.loss_sub
        self.n += 1
        self.images += s.images
        if s.grad_norm_main is not None:
            self.gn_main += s.grad_norm_main.to(self.gn_main.device)
            if s.grad_norm_sub is not None:
                self.gn_sub += s.grad_norm_sub.to(self.gn_sub.device)
            self.gn_n += 1

    def to_dict(self) -> dict[str, Any]:
        """For the checkpoint: tensors on the CPU."""
        return {f.name: (v.detach().cpu() if isinstance(v := getattr(self, f.name), Tensor) else v)
                for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device) -> Sums:
        out = cls.zeros(device)
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                setattr(out, f.name, v.to(device) if isinstance(v, Tensor) else v)
        return out
