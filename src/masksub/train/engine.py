"""The training loop: a recipe's parts from timm, the step from ``masksub.MaskSub``.

Per optimizer update: ``accum_steps`` micro-batches through ``ms.backward`` (DDP sync on the
last only), one non-finite check, clipping once on the summed gradient, one optimizer step.
Losses stay on the device between log lines; the only per-step host sync is the non-finite
check the policy needs. State that ``--resume`` restores is all in ``_state()``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .. import MaskSub
from ..errors import MaskSubError
from . import checkpoint as ckpt_mod
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
from .logging import RunLog, progress

# Test hook: comma-separated optimizer-update indices whose loss is made NaN.
NAN_ENV = "MASKSUB_TEST_NAN_STEPS"
# Test hook: the same, but the loss stays finite and its gradient is NaN (as a diverging run's).
NAN_GRAD_ENV = "MASKSUB_TEST_NAN_GRAD_STEPS"
# Test hook: after the optimizer step of these updates a weight is inf (an update that overflowed).
INF_UPDATE_ENV = "MASKSUB_TEST_INF_UPDATE_STEPS"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: the test hook's finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g * float("nan")


class TrainingStopped(MaskSubError):
    """The run stopped on purpose (non-finite values); the message says which checkpoint is intact."""


def _fmt_time(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Trainer:
    """Build everything from a validated config (all bad input fails here), then ``run()``."""

    def __init__(self, cfg: Config, *, resume: str | None = None, run_dir: str | None = None,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.dist, self.device = D.setup(cfg.device)
        if cfg.threads:
            _check_threads(cfg.threads)
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed + self.dist.rank)
        import random

        import numpy as np

        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)

        resume_ckpt = ckpt_mod.load(resume) if resume else None
        self.run_dir = _resolve_run_dir(cfg, resume, run_dir)
        if cfg.dist == "fsdp":  # every rank writes its shards there: rank 0's name (a time stamp)
            from .fsdp import same_path

            self.run_dir = same_path(self.run_dir)
        self._lock: Any = None
        self._saved_step: int | None = resume_ckpt["global_step"] if resume_ckpt is not None else None
        refused: MaskSubError | None = None
        self.run_id = (resume_ckpt or {}).get("run_id")
        if self.dist.main:  # one rank looks (the others could see its files appear); all agree
            try:
                self.run_id = _check_run_dir(self.run_dir, resume_ckpt, overwrite=overwrite)
            except MaskSubError as e:
                refused = e
        if D.any_flag(refused is not None, self.dist, self.device):
            raise refused or MaskSubError("rank 0 refused the run directory (see its message)")
        model = build_model(cfg, pretrained=resume_ckpt is None).to(self.device)  # a resume has its weights
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model_raw = model
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

        self.fsdp = None  # dist=fsdp: the model sharded now, after MaskSub added its parameters
        if cfg.dist == "fsdp":
            from . import fsdp

            self.fsdp = fsdp.setup(model, cfg, self.dist.enabled, self.device)
            self.ms.sync_main = self.step_ms.sync_main = cfg.fsdp_sync_main
        self.optimizer = build_optimizer(cfg, model)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")

        self.train_data, self.val_data = build_data(cfg, device=self.device, rank=self.dist.rank,
                                                    world=self.dist.world)
        self.updates_per_epoch = max(1, self.train_data.num_batches(0) // cfg.accum_steps)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.updates_per_epoch)
        self.mixup = build_mixup(cfg)
        self.criterion = build_criterion(cfg)
        self.eval_criterion = label_criterion(cfg)

        net: nn.Module = model
        if self.dist.enabled and self.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DDP(model, device_ids=ids, find_unused_parameters=self.analysis_ms not in (None, self.ms))
        if cfg.compile:
            net = torch.compile(net)
        self.ms.model = self.step_ms.model = net
        if self.analysis_ms is not None:
            self.analysis_ms.model = net

        # progress state (what a checkpoint holds besides the modules)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_top1 = -1.0
        self.best_epoch = -1
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.acc = self._new_acc()
        self.last_eval: dict[str, Any] = {}
        self.elapsed = 0.0
        self._stop_signal: int | None = None
        self._bad_what = "loss"

        if resume_ckpt is not None:
            self._restore(resume_ckpt, resume)
        # nothing is written before this point: the lock first, then what the run owns
        if self.dist.main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MaskSubError(f"cannot write the run directory {self.run_dir} ({e.strerror or e}); "
                                   "choose another --output (or --run-name)") from None
        self._lock = _lock_run_dir(self.run_dir) if self.dist.main else None
        if D.any_flag(self.dist.main and self._lock is None, self.dist, self.device):
            raise MaskSubError(_locked_message(self.run_dir))
        if self.dist.main:
            if overwrite and resume_ckpt is None:
                _clear_run_dir(self.run_dir)
            (self.run_dir / "run.json").write_text(json.dumps({"run_id": self.run_id}) + "\n")
            if resume_ckpt is not None:
                _trim_metrics(self.run_dir, resume_ckpt)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            for stale in self.run_dir.glob(".*.pt.tmp-*"):  # left by a writer killed mid-write
                stale.unlink(missing_ok=True)
        self.log = RunLog(self.run_dir, enabled=self.dist.main, tensorboard=cfg.tensorboard)
        nan = os.environ.get(NAN_ENV, "")
        self.nan_steps = {int(s) for s in nan.split(",") if s.strip()}
        self.nan_grad_steps = {int(s) for s in os.environ.get(NAN_GRAD_ENV, "").split(",") if s.strip()}
        self.inf_update_steps = {int(s) for s in os.environ.get(INF_UPDATE_ENV, "").split(",") if s.strip()}

    # -- state -------------------------------------------------------------------------------
    def _new_acc(self) -> dict[str, Any]:
        z = torch.zeros((), device=self.device)
        return {"loss_main": z.clone(), "loss_sub": z.clone(), "n": 0, "gn_main": z.clone(),
                "gn_sub": z.clone(), "gn_n": 0, "skipped": 0, "time_s": 0.0}

    def _state(self) -> dict[str, Any]:
        rng = ckpt_mod.rng_state()
        acc = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in self.acc.items()}
        if self.dist.enabled:  # each rank's own RNG streams and epoch sums (reduced at epoch end)
            import torch.distributed as dist

            all_rng: list[Any] = [None] * self.dist.world
            dist.all_gather_object(all_rng, rng)
            all_acc: list[Any] = [None] * self.dist.world
            dist.all_gather_object(all_acc, acc)
        else:
            all_rng, all_acc = [rng], [acc]
        return {
            "model_name": self.cfg.model,
            "signature": ckpt_mod.model_signature(self.model_raw),
            "model": self.model_raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch,
            "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
            "acc": acc, "acc_ranks": all_acc, "elapsed": self.elapsed, "last_eval": self.last_eval,
            "rng": all_rng, "world": self.dist.world, "config": self.cfg.to_dict(), "run_id": self.run_id,
        }

    def _restore(self, ck: dict[str, Any], path: str | None) -> None:
        ckpt_mod.check_model(ck, self.model_raw, self.cfg.model, path or "")
        if ck.get("sharded") or self.fsdp is not None:  # model and optimizer in a DCP directory
            from . import fsdp

            fsdp.load(ck, path or "", self.model_raw, self.optimizer)
        else:
            self.model_raw.load_state_dict(ck["model"])
            try:
                self.optimizer.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError) as e:
                raise MaskSubError(f"checkpoint {path}: optimizer state does not fit this optimizer ({e}); "
                                   "resume with the same opt / layer_decay") from None
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None:
            if ck.get("ema") is None:
                raise MaskSubError(f"checkpoint {path} has no EMA weights but this run has ema: true")
            self.ema.load_state_dict(ck["ema"])
        for k in ("epoch", "step_in_epoch", "global_step", "best_top1", "best_epoch",
                  "nonfinite_total", "nonfinite_run", "elapsed", "last_eval"):
            setattr(self, k, ck[k])
        acc = ck["acc"]
        if ck.get("world") == self.dist.world and len(ck.get("acc_ranks") or []) == self.dist.world:
            acc = ck["acc_ranks"][self.dist.rank]  # this rank's own partial epoch sums
        self.acc = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in acc.items()}
        rngs = ck["rng"]
        if ck.get("world") != self.dist.world:
            print(f"masksub train: resuming a {ck.get('world')}-process run on {self.dist.world}: "
                  "data order and random streams will differ from an uninterrupted run", file=sys.stderr)
        ckpt_mod.set_rng_state(rngs[self.dist.rank % len(rngs)])

    def save(self, name: str = "last.pt", state: dict[str, Any] | None = None) -> Path | None:
        """Write a checkpoint, never one with non-finite weights or optimizer state (that stops the
        run and leaves the last good one); a failed write (full disk) leaves the previous one too."""
        state = state or self._state()  # every rank joins the RNG gather
        bad = _nonfinite_tensors(self.fsdp.local_view(state) if self.fsdp is not None else state)
        if D.any_flag(bool(bad), self.dist, self.device):
            raise TrainingStopped(
                f"the model weights or optimizer state are not finite after step {self.global_step - 1} "
                f"(e.g. {', '.join(bad[:3]) or 'on another rank'}); no checkpoint was written: "
                f"{self._intact()}. Lower lr, raise warmup_epochs, set clip_grad, or use bf16 instead of fp16")
        if self.fsdp is not None:  # every rank writes its shards
            path = self.fsdp.save(self.run_dir, name, state, self.model_raw, self.optimizer, self.dist.main)
            if name == "last.pt":
                self._saved_step = state["global_step"]
            return path
        if not self.dist.main:
            return None
        try:
            path = ckpt_mod.save(self.run_dir / name, state)
        except OSError as e:
            raise MaskSubError(
                f"cannot write checkpoint {self.run_dir / name} ({e.strerror or e}); {self._intact()}. "
                f"Free space (or move the run), then continue with: masksub train --resume {self.run_dir}"
            ) from None
        if name == "last.pt":
            self._saved_step = state["global_step"]
        return path

    def _intact(self) -> str:
        """Where the last good checkpoint is, said truthfully."""
        if self._saved_step is None:
            return "this run has no checkpoint yet"
        return f"{self.run_dir / 'last.pt'} is intact, from step {self._saved_step}"

    def close(self) -> None:
        """Release the run directory's lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._stop_signal = signum
        if self.dist.main:
            print(f"\nmasksub train: {signal.Signals(signum).name}: finishing this step, then "
                  "writing a checkpoint", file=sys.stderr)

    # -- pieces ------------------------------------------------------------------------------
    def _criterion(self) -> Any:
        if self.global_step in self.nan_steps:
            return lambda logits, y: self.criterion(logits, y) * float("nan")
        if self.global_step in self.nan_grad_steps:
            return lambda logits, y: self.criterion(_NanGrad.apply(logits), y)
        return self.criterion

    def _update(self) -> tuple[bool, Any]:
        """One optimizer update of ``accum_steps`` micro-batches; False if it was skipped."""
        cfg = self.cfg
        crit = self._criterion()
        # per-branch gradient norms (Figure 2d); the baseline and masking-only runs have one branch
        gn = cfg.analysis and self.global_step % cfg.grad_norm_every == 0
        total = torch.zeros((), device=self.device)
        lm = torch.zeros((), device=self.device)
        ls = torch.zeros((), device=self.device)
        gnm = gns = None
        n_img = 0
        for i in range(cfg.accum_steps):
            x, y = next(self._it)
            n_img += x.shape[0]
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            last = i == cfg.accum_steps - 1
            scale = 1.0 / cfg.accum_steps
            out = self.step_ms.backward(x, y, crit, scaler=self.scaler if self.scaler.is_enabled() else None,
                                        grad_norms=gn and last, sync=last, loss_scale=scale)
            total += out.loss
            lm += out.loss_main
            if out.loss_sub is not None:
                ls += out.loss_sub
            if out.grad_norm_main is not None:
                gnm, gns = out.grad_norm_main, out.grad_norm_sub
        k = cfg.accum_steps
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        gnorm = self._clip_and_norm()
        # the one per-step sync (after the all-reduce under DDP): never step on a non-finite loss or
        # gradient. fp16: an inf gradient is the GradScaler's to skip (and lower its scale), as usual.
        flags = [~torch.isfinite(total)]
        if gnorm is not None and not self.scaler.is_enabled():
            flags.append(~torch.isfinite(gnorm))
        bad = D.any_flags(torch.stack(flags), self.dist, self.device)
        if any(bad):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update(self.scaler.get_scale() * 0.5)
            self._bad_what = "loss" if bad[0] else "gradient norm"
            return False, None
        self.scheduler.step_update(self.global_step)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.global_step in self.inf_update_steps:
            with torch.no_grad():
                next(self.model_raw.parameters()).view(-1)[0] = float("inf")
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model_raw, step=self.global_step)
        return True, (lm / k, ls / k, gnm, gns, n_img)

    def _clip_and_norm(self) -> Tensor | None:
        """The total gradient norm: the one clipping computes anyway, else computed on the device
        (no host sync). None for fp16 without clipping: the GradScaler checks the gradient itself."""
        params = [p for p in self.model_raw.parameters() if p.grad is not None]
        if self.cfg.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        elif self.scaler.is_enabled():
            return None
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: of the whole

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """top-1 / top-5 / loss over the whole validation set, summed over ranks."""
        model = model or self.ms.model
        was = model.training
        model.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, top1, top5, n
        amp = AMP_DTYPES[self.cfg.amp]
        ctx = torch.autocast(self.device.type, dtype=amp) if amp else contextlib.nullcontext()
        bar = progress(self.val_data.num_batches(0), "eval", enabled=self.dist.main and self.cfg.progress)
        batches = self.val_data.iterate(0, 0)
        if self.fsdp is not None:  # every rank runs as many (collective) forwards
            batches = self.fsdp.even(batches, model, self.dist, self.device, self._probe_shape)
        for x, y in batches:
            bar.update(1)
            with ctx:
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            sums += torch.stack([
                self.eval_criterion(logits, y).double() * y.shape[0], hit[:, 0].sum().double(),
                hit.any(1).sum().double(), torch.tensor(float(y.shape[0]), device=self.device, dtype=torch.float64),
            ])
        bar.close()
        sums = D.all_sum(sums, self.dist)
        model.train(was)
        n = max(sums[3].item(), 1.0)
        return {"top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
                "val_loss": sums[0].item() / n, "val_count": int(sums[3].item())}

    @torch.no_grad()
    def train_losses(self) -> dict[str, float]:
        """Eq. (1) and Eq. (2) (50% mask) on a fixed, unaugmented training subset (Figure 2)."""
        ams = self.analysis_ms
        net = ams.model
        was = net.training
        net.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        g = torch.get_rng_state()  # the analysis must not shift the training's random stream
        gc = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        torch.manual_seed(12345)
        batches = self.train_data.plain(self.cfg.analysis_subset)
        if self.fsdp is not None:
            batches = self.fsdp.even(batches, lambda x: (ams.forward_main(x), ams.forward_sub(x)), self.dist,
                                     self.device, self._probe_shape)
        for x, y in batches:
            lu = self.eval_criterion(ams.forward_main(x).float(), y)
            lmask = self.eval_criterion(ams.forward_sub(x).float(), y)
            sums += torch.stack([lu.double() * len(y), lmask.double() * len(y),
                                 torch.tensor(float(len(y)), device=self.device, dtype=torch.float64)])
        torch.set_rng_state(g)
        if gc is not None:
            torch.cuda.set_rng_state(gc)
        sums = D.all_sum(sums, self.dist)
        net.train(was)
        n = max(sums[2].item(), 1.0)
        return {"train_loss_unmasked": sums[0].item() / n, "train_loss_masked": sums[1].item() / n}

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.log.close()

    def _new_win(self) -> dict[str, Any]:
        """The losses, update count, images and start time since the last step line."""
        z = torch.zeros((), device=self.device)
        return {"lm": z, "ls": z.clone(), "n": 0, "imgs": 0, "t0": time.perf_counter()}

    def _log_step(self) -> dict[str, Any]:
        win = D.all_sum(torch.stack([self._win["lm"], self._win["ls"],
                                     torch.tensor(float(self._win["n"]), device=self.device)]), self.dist)
        lm, ls, n = win[0], win[1], max(win[2].item(), 1.0)
        dt = max(time.perf_counter() - self._win["t0"], 1e-9)
        rec = {"kind": "step", "step": self.global_step, "epoch": self.epoch,
               "loss_main": (lm / n).item(),
               "loss_sub": (ls / n).item() if self.ms.branch is not None and not self.cfg.masking_only else None,
               "lr": self.optimizer.param_groups[0]["lr"],
               "imgs_per_s": self._win["imgs"] * self.dist.world / dt, "skipped_nonfinite": self.nonfinite_total}
        self.log.write(rec, tb_step=self.global_step)
        return rec

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        main = self.dist.main
        t_start = time.perf_counter() - self.elapsed
        stopped: str | None = None
        upe = self.updates_per_epoch
        if main:
            where = f"resuming at epoch {self.epoch + 1}, step {self.global_step}" if self.global_step else "starting"
            n_params = sum(p.numel() for p in self.model_raw.parameters()) / 1e6
            print(f"masksub train: {cfg.recipe or cfg.model} ({n_params:.2f}M params), sub={cfg.sub}"
                  f"{'' if self.ms.branch is None else f' ratio={self.ms.ratio}'}, {cfg.epochs} epochs x "
                  f"{upe} steps, {self.device.type} x{self.dist.world}; {where}; run dir {self.run_dir}",
                  file=sys.stderr)
        while self.epoch < cfg.epochs and stopped is None:
            ep_t0 = time.perf_counter()
            self.ms.model.train()
            if cfg.sched_step == "epoch":  # DeiT-III / RSB: the lr changes at epoch starts only
                self.scheduler.step(max(self.epoch - cfg.sched_epoch_lag, 0))
            self._it = self.train_data.iterate(self.epoch, self.step_in_epoch * cfg.accum_steps)
            bar = progress(upe, f"epoch {self.epoch + 1}/{cfg.epochs}", enabled=main and cfg.progress,
                           initial=self.step_in_epoch)
            self._win = self._new_win()
            while self.step_in_epoch < upe:
                ok, res = self._update()
                if ok:
                    lm, ls, gnm, gns, n_img = res
                    self.acc["loss_main"] += lm
                    self.acc["loss_sub"] += ls
                    self.acc["n"] += 1
                    self._win["lm"] += lm
                    self._win["ls"] += ls
                    self._win["n"] += 1
                    self._win["imgs"] += n_img
                    if gnm is not None:
                        self.acc["gn_main"] += gnm.to(self.device)
                        if gns is not None:
                            self.acc["gn_sub"] += gns.to(self.device)
                        self.acc["gn_n"] += 1
                    self.nonfinite_run = 0
                else:
                    self.nonfinite_total += 1
                    self.nonfinite_run += 1
                    self.acc["skipped"] += 1
                    if main:
                        print(f"masksub train: non-finite {self._bad_what} at step {self.global_step} (epoch "
                              f"{self.epoch + 1}); step skipped ({self.nonfinite_run} in a row)", file=sys.stderr)
                self.global_step += 1
                self.step_in_epoch += 1
                bar.update(1)
                if self.nonfinite_run >= cfg.nonfinite_max:
                    bar.close()
                    first = self.global_step - self.nonfinite_run
                    what = (f"the loss was not finite for {self.nonfinite_run} steps in a row (steps {first}"
                            f"-{self.global_step - 1}); stopped at step {self.global_step - 1}")
                    try:
                        self.save()
                    except TrainingStopped as e:  # the weights went bad before the losses did
                        raise TrainingStopped(f"{what}; {e}") from None
                    raise TrainingStopped(
                        f"{what}. The weights in {self.run_dir / 'last.pt'} are from before step {first} "
                        "(no NaN was applied). Lower lr, raise warmup_epochs, set clip_grad, or use bf16 "
                        "instead of fp16"
                    )
                if self._win["n"] and self.global_step % cfg.log_every == 0:
                    rec = self._log_step()
                    if main and cfg.progress:
                        bar.set_postfix(loss=f"{rec['loss_main']:.3f}", lr=f"{rec['lr']:.2e}", refresh=False)
                    self._win = self._new_win()
                end_of_epoch = self.step_in_epoch >= upe
                sig = D.any_flag(self._stop_signal is not None, self.dist, self.device)
                if sig:
                    stopped = "signal"
                elif cfg.max_steps and self.global_step >= cfg.max_steps and not end_of_epoch:
                    stopped = "max_steps"
                elif cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 and not end_of_epoch:
                    self.acc["time_s"] += time.perf_counter() - ep_t0
                    ep_t0 = time.perf_counter()
                    self.elapsed = time.perf_counter() - t_start
                    self.save()
                if stopped:
                    break
            bar.close()
            self.acc["time_s"] += time.perf_counter() - ep_t0
            if stopped:
                break
            self._end_epoch()
            self.elapsed = time.perf_counter() - t_start
            self.save()
            if self.last_eval.get("is_best"):
                self.save("best.pt")
            if cfg.max_steps and self.global_step >= cfg.max_steps and self.epoch < cfg.epochs:
                stopped = "max_steps"
        self.elapsed = time.perf_counter() - t_start
        if stopped:
            self.save()
            msg = {"signal": f"stopped by {signal.Signals(self._stop_signal).name if self._stop_signal else 'a signal'}",
                   "max_steps": f"stopped at max_steps={cfg.max_steps}"}[stopped]
            if main:
                print(f"masksub train: {msg} at step {self.global_step}; checkpoint written; "
                      f"continue with: masksub train --resume {self.run_dir}", file=sys.stderr)
        return self._summary(stopped)

    def _end_epoch(self) -> None:
        cfg = self.cfg
        losses = torch.stack([self.acc["loss_main"], self.acc["loss_sub"],
                              torch.tensor(float(self.acc["n"]), device=self.device)]).double()
        losses = D.all_sum(losses, self.dist)
        rec: dict[str, Any] = {"kind": "epoch", "epoch": self.epoch + 1, "step": self.global_step}
        if losses[2].item() == 0:  # every step skipped: no loss to report, nothing was trained
            self.save()
            raise TrainingStopped(
                f"no step of epoch {self.epoch + 1} had a finite loss or gradient ({self.acc['skipped']} "
                f"skipped); nothing was trained in it. {self._intact()} (the weights before the epoch). "
                "Check the data normalisation (mean / std) and lr")
        denom = max(losses[2].item(), 1.0)
        rec["loss_main"] = losses[0].item() / denom
        rec["loss_sub"] = (losses[1].item() / denom) if self.ms.branch is not None and not cfg.masking_only else None
        do_eval = (self.epoch + 1) % cfg.eval_every == 0 or self.epoch + 1 == cfg.epochs
        if do_eval:
            rec.update(self.evaluate())
            if self.ema is not None:
                e = self.evaluate(self.ema.module)
                rec.update({"ema_top1": e["top1"], "ema_top5": e["top5"], "ema_val_loss": e["val_loss"]})
            if cfg.analysis:
                rec.update(self.train_losses())
        if cfg.analysis and self.acc["gn_n"]:
            g = D.all_sum(torch.stack([self.acc["gn_main"], self.acc["gn_sub"]]).double(), self.dist)
            g = g / (self.acc["gn_n"] * self.dist.world)
            rec["grad_norm_main"] = g[0].item()
            if self.ms.branch is not None and not cfg.masking_only:
                rec["grad_norm_sub"] = g[1].item()
        rec["lr"] = self.optimizer.param_groups[0]["lr"]
        rec["time_s"] = self.acc["time_s"]
        rec["skipped_nonfinite"] = self.acc["skipped"]
        rec["world_size"] = self.dist.world
        rec["train_steps"] = int(losses[2].item())  # updates summed over ranks
        score = max(rec.get("top1", -1.0), rec.get("ema_top1", -1.0))
        rec["is_best"] = do_eval and score > self.best_top1
        if rec["is_best"]:
            self.best_top1, self.best_epoch = score, self.epoch + 1
        self.log.write(rec, tb_step=self.epoch + 1)
        if self.dist.main:
            parts = [f"epoch {self.epoch + 1}/{cfg.epochs}", f"loss {rec['loss_main']:.4f}"]
            if rec["loss_sub"] is not None:
                parts.append(f"sub {rec['loss_sub']:.4f}")
            if "top1" in rec:
                parts.append(f"top-1 {rec['top1']:.2f}%")
            if "ema_top1" in rec:
                parts.append(f"ema {rec['ema_top1']:.2f}%")
            parts.append(_fmt_time(rec["time_s"]))
            print("masksub train: " + ", ".join(parts), file=sys.stderr)
        self.last_eval = rec
        self.epoch += 1
        self.step_in_epoch = 0
        self.acc = self._new_acc()

    def _summary(self, stopped: str | None) -> dict[str, Any]:
        ev = self.last_eval
        s = {"run_dir": str(self.run_dir), "recipe": self.cfg.recipe, "model": self.cfg.model,
             "sub": self.cfg.sub, "ratio": self.ms.ratio if self.ms.branch is not None else None,
             "masking_only": self.cfg.masking_only, "epochs_done": self.epoch, "steps": self.global_step,
             "top1": ev.get("top1"), "top5": ev.get("top5"), "ema_top1": ev.get("ema_top1"),
             "best_top1": self.best_top1 if self.best_top1 >= 0 else None, "best_epoch": self.best_epoch,
             "train_loss_unmasked": ev.get("train_loss_unmasked"), "train_loss_masked": ev.get("train_loss_masked"),
             "skipped_nonfinite": self.nonfinite_total, "time_s": self.elapsed, "stopped": stopped,
             "world_size": self.dist.world, "signal": self._stop_signal}
        if self.dist.main:
            (self.run_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
            if not stopped:
                top1 = "n/a" if s["top1"] is None else f"{s['top1']:.2f}%"
                top5 = "n/a" if s["top5"] is None else f"{s['top5']:.2f}%"
                print(f"masksub train: done: top-1 {top1}, top-5 {top5} "
                      f"(best {s['best_top1'] or 0:.2f}% at epoch {self.best_epoch}), {self.epoch} epochs, "
                      f"{self.global_step} steps in {_fmt_time(self.elapsed)}; run dir {self.run_dir}")
        return s


def train(cfg: Config, *, resume: str | None = None, run_dir: str | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Build, run, tear down: the whole ``masksub train``; returns the summary dict."""
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, run_dir=run_dir, overwrite=overwrite)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        D.teardown()



# -- the run directory: one run, one process, a log that matches its checkpoint -------------------
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "config.yaml", "run.json")
LOCK_FILE = ".masksub.lock"


def _resolve_run_dir(cfg: Config, resume: str | None, run_dir: str | None) -> Path:
    if run_dir:
        return Path(run_dir)
    if resume:
        p = Path(resume)
        return p if p.is_dir() else p.parent
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output) / (cfg.run_name or f"{cfg.recipe or 'run'}-{cfg.sub}-{stamp}")


def _check_run_dir(run_dir: Path, ck: dict[str, Any] | None, *, overwrite: bool) -> str:
    """Refuse, before any work: a new run in a directory that holds one (unless ``overwrite``),
    a directory that cannot be written, a checkpoint of another run. Returns the run's id."""
    _check_writable(run_dir)  # nothing is made yet: an error later leaves no empty run directory
    own = _read_run_id(run_dir)
    if ck is None:
        held = [n for n in RUN_FILES if (run_dir / n).exists()]
        if held and not overwrite:
            raise MaskSubError(
                f"run directory {run_dir} already holds a run ({', '.join(held)}); continue it with: "
                f"masksub train --resume {run_dir}; or start it again with --overwrite (deletes it), or "
                "pick another --run-name")
        return uuid.uuid4().hex
    theirs = ck.get("run_id")
    if own is not None and theirs is not None and own != theirs:
        raise MaskSubError(
            f"the checkpoint in {run_dir} belongs to another run (run id {theirs[:8]}, this directory's "
            f"run is {own[:8]}; its config: {ck['config'].get('run_name') or ck['config'].get('recipe')!r}): "
            "resume that run's own directory, or copy the checkpoint into an empty directory to continue it there")
    return theirs or own or uuid.uuid4().hex


def _check_writable(run_dir: Path) -> None:
    """The run directory, or the nearest folder above it that exists, must be a writable folder."""
    p = run_dir.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    why = ("is not a folder" if not p.is_dir() else
           "is not writable" if not os.access(p, os.W_OK | os.X_OK) else None)
    if why:
        raise MaskSubError(f"cannot write the run directory {run_dir}: {p} {why}; choose another --output "
                           "(or --run-name)")


def _read_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _clear_run_dir(run_dir: Path) -> None:
    """--overwrite: the old run's files go, so nothing of it mixes into the new one."""
    import shutil

    for n in RUN_FILES:
        (run_dir / n).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)


def _lock_run_dir(run_dir: Path) -> Any:
    """An exclusive lock for the life of the run (released by the OS if the process dies);
    None if another process holds it."""
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _locked_message(run_dir: Path) -> str:
    try:
        pid = (run_dir / LOCK_FILE).read_text().strip() or "?"
    except OSError:
        pid = "?"
    return (f"another masksub process (pid {pid}) is training in {run_dir}; wait for it to end, or stop it "
            f"(it writes a checkpoint) and then continue with: masksub train --resume {run_dir}")


def _trim_metrics(run_dir: Path, ck: dict[str, Any]) -> None:
    """Drop the lines logged after the checkpoint (a process killed between a log line and its
    checkpoint): the resumed run logs them again."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            after = r.get("step", 0) > ck["global_step"] or (r.get("kind") == "epoch" and r.get("epoch", 0) > ck["epoch"])
        except (ValueError, AttributeError, TypeError):
            after = True  # a line cut off by the kill
        if after:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, path)
        print(f"masksub train: dropped {dropped} line(s) of metrics.jsonl logged after the checkpoint "
              f"(step {ck['global_step']}); they are logged again", file=sys.stderr)


def _nonfinite_tensors(state: dict[str, Any]) -> list[str]:
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


def _check_threads(n: int) -> None:
    """More threads than CPUs only slows a run down; far more makes OpenMP crash (segfault)."""
    cpus = os.cpu_count() or 1
    if n > cpus:
        raise MaskSubError(f"threads={n} is more than this machine's {cpus} CPUs; use --threads {cpus} or "
                           "fewer (0 keeps torch's default)")
