"""The trainer's set-up, as named steps in the one order that works.

``Trainer.__init__`` runs them: the run directory is claimed (checked, nothing written),
MaskSub is built on the model (it may add a mask token), FSDP shards the model (after
MaskSub's parameters exist), the optimizer takes the final (sharded) parameters, the data
and schedule follow, then DDP and ``torch.compile`` wrap the model the step runs; a
checkpoint is restored after all of it, and only then is the run directory opened (the first
write). All bad input fails before that write.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .. import MaskSub
from ..errors import MaskSubError
from . import analysis, rundir
from . import distributed as D
from .build import (
    build_criterion,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    label_criterion,
)
from .config import Config, sub_strength
from .data import build_data
from .logging import RunLog
from .stats import Sums


class Setup:
    """The set-up steps of ``Trainer`` (each sets the attributes the loop reads)."""

    cfg: Config
    dist: D.Dist
    device: torch.device
    run_dir: Path

    def _seed(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            _check_threads(cfg.threads)
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed + self.dist.rank)
        import random

        import numpy as np

        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)

    def _claim_run_dir(self, ck: dict[str, Any] | None, resume: str | None, run_dir: str | None,
                       overwrite: bool) -> None:
        """Where the run lives and whether it may: checked by rank 0, agreed by all, nothing written."""
        cfg = self.cfg
        self.run_dir = rundir.resolve(cfg.output, cfg.run_name, cfg.recipe, cfg.sub, resume, run_dir)
        if cfg.dist == "fsdp":  # every rank writes its shards there: rank 0's name (a time stamp)
            from .fsdp import same_path

            self.run_dir = same_path(self.run_dir)
        self._lock: Any = None
        refused: MaskSubError | None = None
        self.run_id = (ck or {}).get("run_id")
        if ck is not None and ck.get("world", self.dist.world) != self.dist.world:
            refused = MaskSubError(_world_message(ck, self.dist.world, self.run_dir))
        elif self.dist.main:  # one rank looks (the others could see its files appear); all agree
            try:
                self.run_id = rundir.check(self.run_dir, ck, overwrite=overwrite)
            except MaskSubError as e:
                refused = e
        if D.any_flag(refused is not None, self.dist, self.device):
            raise refused or MaskSubError("rank 0 refused the run directory (see its message)")

    def _build_masksub(self, *, pretrained: bool) -> None:
        """The model and MaskSub on it (MaskSub may add a mask token: before FSDP and the optimizer)."""
        cfg = self.cfg
        model = build_model(cfg, pretrained=pretrained).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model_raw = model
        from ..step import AMP_DTYPES  # the one map of amp names

        amp_dtype = AMP_DTYPES[cfg.amp]
        kind = "sigmoid" if cfg.bce else "softmax"
        mode = None if cfg.sub == "none" else cfg.sub
        self.ms = MaskSub(model, mode, sub_strength(cfg) if mode else None, family=cfg.family, order=cfg.order, kind=kind,
                          amp_dtype=amp_dtype, **(cfg.family_options if mode else {}))
        # The step: MaskSub itself, or for Eq. (2) a one-branch step whose forward is the sub-branch,
        # so both settings share the same backward, DDP sync and gradient-norm code.
        self.step_ms = self.ms if not cfg.masking_only else MaskSub(
            model, None, forward_fn=lambda _net, x: self.ms.forward_sub(x))
        self._probe_shape = (1, cfg.in_chans, cfg.img_size, cfg.img_size)
        probe = torch.zeros(self._probe_shape, device=self.device)
        self.ms.validate(probe)  # e.g. an image size the mask patch / region does not divide
        self.analysis_ms: MaskSub | None = None
        if cfg.analysis:
            same = mode == "mask" and self.ms.ratio == 0.5
            self.analysis_ms = self.ms if same else MaskSub(
                model, "mask", 0.5, family=cfg.family, kind=kind, amp_dtype=amp_dtype, **cfg.family_options)
            self.analysis_ms.validate(probe)
            analysis.check(self.analysis_ms, model, probe)  # refused now, not at the end of epoch 1

    def _shard(self) -> None:
        """dist=fsdp: the model sharded now, after MaskSub added its parameters."""
        self.fsdp = None
        if self.cfg.dist == "fsdp":
            from . import fsdp

            self.fsdp = fsdp.setup(self.model_raw, self.cfg, self.dist.enabled, self.device)
            self.ms.sync_main = self.step_ms.sync_main = self.cfg.fsdp_sync_main

    def _build_optimizer(self) -> None:
        """The optimizer on the final (sharded) parameters; the EMA copy; the fp16 loss scaler."""
        cfg = self.cfg
        self.optimizer = build_optimizer(cfg, self.model_raw)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model_raw, decay=cfg.ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")

    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_data, self.val_data = build_data(cfg, device=self.device, rank=self.dist.rank,
                                                    world=self.dist.world)
        batches = self.train_data.num_batches(0)
        if cfg.accum_steps > batches:
            raise MaskSubError(
                f"accum_steps={cfg.accum_steps} is more than the {batches} batch(es) of an epoch "
                f"({len(self.train_data)} training images, batch_size {cfg.batch_size}"
                f"{f' on each of {self.dist.world} processes' if self.dist.enabled else ''}); one optimizer "
                f"update would need more than an epoch. Use accum_steps={batches} or fewer, or a smaller "
                "batch_size")
        self.updates_per_epoch = max(1, batches // cfg.accum_steps)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.updates_per_epoch)
        self.mixup = build_mixup(cfg)
        self.criterion = build_criterion(cfg)
        self.eval_criterion = label_criterion(cfg)

    def _wrap(self) -> None:
        """DDP (not under FSDP) and torch.compile around the model the steps run."""
        net: nn.Module = self.model_raw
        if self.dist.enabled and self.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DDP(net, device_ids=ids, find_unused_parameters=self.analysis_ms not in (None, self.ms))
        if self.cfg.compile:
            net = torch.compile(net)
        self.ms.model = self.step_ms.model = net
        if self.analysis_ms is not None:
            self.analysis_ms.model = net

    def _init_progress(self) -> None:
        """The progress state: what a checkpoint holds besides the modules."""
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_top1 = -1.0
        self.best_epoch = -1
        self.best_weights = "model"  # which weights scored best_top1: "model" or "ema"
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.acc = Sums.zeros(self.device)
        self.last_eval: dict[str, Any] = {}
        self.elapsed = 0.0
        self.stopped: str | None = None
        self._stop_signal: int | None = None
        self._bad_what = "loss"

    def _open_run_dir(self, resume_ckpt: dict[str, Any] | None, overwrite: bool) -> None:
        """Nothing is written before this point: the folder, the lock, then what the run owns."""
        cfg = self.cfg
        resuming = resume_ckpt is not None
        if self.dist.main:
            rundir.make(self.run_dir, resuming=resuming)
        self._lock = rundir.lock(self.run_dir) if self.dist.main else None
        if D.any_flag(self.dist.main and self._lock is None, self.dist, self.device):
            raise MaskSubError(rundir.locked_message(self.run_dir))
        if self.dist.main:
            if not resuming:  # a new run: --overwrite, or a folder without a checkpoint (no run)
                rundir.clear(self.run_dir)
            if resuming:
                rundir.trim_metrics(self.run_dir, resume_ckpt)
            (self.run_dir / "run.json").write_text(json.dumps({"run_id": self.run_id}) + "\n")
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            for stale in self.run_dir.glob(".*.pt.tmp-*"):  # left by a writer killed mid-write
                stale.unlink(missing_ok=True)
        self.log = RunLog(self.run_dir, enabled=self.dist.main, tensorboard=cfg.tensorboard)

    def _repair_best(self) -> None:
        """A resumed run whose best.pt is missing (an older writer killed between last.pt and it):
        rewritten when last.pt is that best state, else the best is measured again."""
        if self.best_epoch <= 0 or not self.saver.best_is_missing(self.best_epoch, self.epoch):
            return
        if self.epoch == self.best_epoch and self.step_in_epoch == 0:
            self.saver.save({**self._state(), "eval_weights": self.best_weights}, "best.pt")
            msg = f"rewrote the missing best.pt (epoch {self.best_epoch}) from last.pt"
        else:
            msg = (f"best.pt of epoch {self.best_epoch} is missing and cannot be rebuilt; the next "
                   "evaluation writes a new one")
            self.best_top1, self.best_epoch, self.best_weights = -1.0, -1, "model"
        if self.dist.main:
            print(f"masksub train: {msg}", file=sys.stderr)


def _world_message(ck: dict[str, Any], world: int, run_dir: Any) -> str:
    n = ck.get("world")
    how = (f"torchrun --nproc_per_node {n} -m masksub.cli train --resume {run_dir}" if n and n > 1
           else f"masksub train --resume {run_dir} (one process)")
    return (f"this run was trained on {n} process(es) and this resume has {world}: its steps per epoch, lr "
            f"schedule (warm-up, cosine) and data position count {n}-process updates, and would stretch or "
            f"shrink. Continue it with: {how}; or start a new run from its weights (pretrained_file=)")


def _check_threads(n: int) -> None:
    """More threads than CPUs only slows a run down; far more makes OpenMP crash (segfault)."""
    cpus = os.cpu_count() or 1
    if n > cpus:
        raise MaskSubError(f"threads={n} is more than this machine's {cpus} CPUs; use --threads {cpus} or "
                           "fewer (0 keeps torch's default)")
