"""Run-directory output: metrics.jsonl, TensorBoard events and a tqdm bar (rank 0 only)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep it readable
    return v


class RunLog:
    """One JSON object per line in ``metrics.jsonl``; numeric fields also go to TensorBoard."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.tb = None
        self.file = None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                print("masksub train: tensorboard not installed; no event files", file=sys.stderr)

    def write(self, record: dict[str, Any], tb_step: int | None = None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self.tb is not None and tb_step is not None:
            kind = record.get("kind", "x")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch", "kind"):
                    self.tb.add_scalar(f"{kind}/{k}", v, tb_step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def progress(total: int, desc: str, *, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar with rate and ETA (or a no-op when disabled / not rank 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True,
                leave=False, unit="step", file=sys.stderr, mininterval=1.0)
