"""The training loop: a recipe's parts from timm, the step from ``masksub.MaskSub``.

Per optimizer update: ``accum_steps`` micro-batches through ``ms.backward`` (DDP sync on the
last only), one non-finite check, clipping once on the summed gradient, one optimizer step.
Losses stay on the device between log lines; the only per-step host sync is the non-finite
check the policy needs. State that ``--resume`` restores is all in ``_state()``. The run
directory lives in ``rundir``, what gets written when in ``saver``, the sums in ``stats``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError
from ..step import AMP_DTYPES
from . import analysis
from . import checkpoint as ckpt_mod
from . import distributed as D
from .config import Config
from .logging import progress
from .param_groups import peak_lr
from .saver import Saver, TrainingStopped
from .setup import Setup
from .stats import StepStats, Sums

__all__ = ["AMP_DTYPES", "Trainer", "TrainingStopped", "train"]

# Why a run stopped before its last epoch (None: it did not).
STOP_SIGNAL, STOP_MAX_STEPS = "signal", "max_steps"


def _fmt_time(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Trainer(Setup):
    """Build everything from a validated config (all bad input fails here), then ``run()``.

    The set-up steps (``setup.Setup``) run in the one order that works; see that module."""

    def __init__(self, cfg: Config, *, resume: str | None = None, run_dir: str | None = None,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.dist, self.device = D.setup(cfg.device)
        self._seed()
        resume_ckpt = ckpt_mod.load(resume) if resume else None
        self._claim_run_dir(resume_ckpt, resume, run_dir, overwrite)
        self._build_masksub(pretrained=resume_ckpt is None)  # a resume has its weights
        self._shard()
        self._build_optimizer()
        self._build_data()
        self._wrap()
        self._init_progress()
        self.saver = Saver(self.run_dir, self.dist, self.device, self.fsdp, self.model_raw, self.optimizer,
                           resume_ckpt["global_step"] if resume_ckpt is not None else None)
        if resume_ckpt is not None:
            self._restore(resume_ckpt, resume)
        self._open_run_dir(resume_ckpt, overwrite)
        if resume_ckpt is not None:
            self._repair_best()

    # -- state -------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        rng = ckpt_mod.rng_state()
        acc = self.acc.to_dict()
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
            "best_top1": self.best_top1, "best_epoch": self.best_epoch, "best_weights": self.best_weights,
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
        self.best_weights = ck.get("best_weights", "model")
        acc = ck["acc"]
        if ck.get("world") == self.dist.world and len(ck.get("acc_ranks") or []) == self.dist.world:
            acc = ck["acc_ranks"][self.dist.rank]  # this rank's own partial epoch sums
        self.acc = Sums.from_dict(acc, self.device)
        rngs = ck["rng"]
        ckpt_mod.set_rng_state(rngs[self.dist.rank % len(rngs)])

    def save(self, name: str = "last.pt") -> Path | None:
        """This state as ``name`` (every rank joins: the RNG gather, FSDP shards)."""
        return self.saver.save(self._state(), name)

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
    def _mix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """timm's Mixup / CutMix mixes pairs: in a batch of odd size the last image keeps its own
        (smoothed) label, the rest are mixed as usual."""
        if x.shape[0] % 2 == 0:
            return self.mixup(x, y)
        from timm.data.mixup import mixup_target

        last = mixup_target(y[-1:], self.mixup.num_classes, 1.0, self.mixup.label_smoothing)
        if x.shape[0] == 1:
            return x, last
        xm, ym = self.mixup(x[:-1].clone(), y[:-1])
        return torch.cat([xm, x[-1:]]), torch.cat([ym, last.to(ym.dtype)])

    def _update(self) -> StepStats | None:
        """One optimizer update of ``accum_steps`` micro-batches; None if it was skipped."""
        cfg = self.cfg
        crit = self.criterion
        # per-branch gradient norms (Figure 2d); the baseline and masking-only runs have one branch
        gn = cfg.analysis and self.global_step % cfg.grad_norm_every == 0
        total = torch.zeros((), device=self.device)
        lm = torch.zeros((), device=self.device)
        ls = torch.zeros((), device=self.device)
        meter = analysis.GradNormMeter(self.step_ms, self.device) if gn else None  # Figure 2d, one scale
        n_img = 0
        for i in range(cfg.accum_steps):
            x, y = next(self._it)
            n_img += x.shape[0]
            if self.mixup is not None:
                x, y = self._mix(x, y)
            last = i == cfg.accum_steps - 1
            scale = 1.0 / cfg.accum_steps
            out = self.step_ms.backward(x, y, crit, scaler=self.scaler if self.scaler.is_enabled() else None,
                                        grad_norms=gn, sync=last, loss_scale=scale)
            total += out.loss
            lm += out.loss_main
            if out.loss_sub is not None:
                ls += out.loss_sub
            if meter is not None:
                meter.add(out, scale)
        k = cfg.accum_steps
        gnm, gns = meter.result() if meter is not None else (None, None)
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
            return None
        self.scheduler.step_update(self.global_step)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model_raw, step=self.global_step)
        return StepStats(lm / k, ls / k, gnm, gns, n_img)

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
            batches = self.fsdp.even(batches, lambda x: (ams.forward_main(x), analysis.masked_forward(
                ams, self.model_raw, x)), self.dist,
                                     self.device, self._probe_shape)
        for x, y in batches:
            lu = self.eval_criterion(ams.forward_main(x).float(), y)
            lmask = self.eval_criterion(analysis.masked_forward(ams, self.model_raw, x).float(), y)
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
        except RuntimeError as e:
            if self.dist.enabled and _lost_peer(e):
                # Said now, while this process still holds SIGTERM: the launcher stops the
                # survivors once it sees a rank die, and the teardown that follows can outlast it.
                stop = TrainingStopped(self._lost_peer_message(e))
                stop.report()
                raise stop from None
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.log.close()

    def _lost_peer_message(self, e: BaseException) -> str:
        text = str(e).lower()
        why = next((w for w in ("connection reset", "connection closed", "broken pipe", "connection refused",
                                "timeout", "timed out") if w in text), type(e).__name__)
        return (f"another process of this run ended (rank {self.dist.rank} of {self.dist.world} lost its peers at "
                f"step {self.global_step}: {why}); no checkpoint was written now: {self.saver.intact()}. "
                f"Continue with the same number of processes: torchrun --nproc_per_node {self.dist.world} "
                f"-m masksub.cli train --resume {self.run_dir}")

    def _log_step(self, win: Sums, t0: float) -> dict[str, Any]:
        s = D.all_sum(torch.stack([win.loss_main, win.loss_sub, torch.tensor(float(win.n), device=self.device)]),
                      self.dist)
        lm, ls, n = s[0], s[1], max(s[2].item(), 1.0)
        dt = max(time.perf_counter() - t0, 1e-9)
        rec = {"kind": "step", "step": self.global_step, "epoch": self.epoch,
               "loss_main": (lm / n).item(),
               "loss_sub": (ls / n).item() if self.ms.branch is not None and not self.cfg.masking_only else None,
               "lr": peak_lr(self.optimizer),
               "imgs_per_s": win.images * self.dist.world / dt, "skipped_nonfinite": self.nonfinite_total}
        self.log.write(rec, tb_step=self.global_step)
        return rec

    def _stop_reason(self, *, at_epoch_end: bool) -> str | None:
        """Why the run stops here, if it does: after an update (a signal, ``max_steps`` inside an
        epoch) or after an epoch's evaluation and checkpoint (``max_steps`` on its last update)."""
        cfg = self.cfg
        if not at_epoch_end and D.any_flag(self._stop_signal is not None, self.dist, self.device):
            return STOP_SIGNAL
        if cfg.max_steps and self.global_step >= cfg.max_steps:
            if at_epoch_end:
                return STOP_MAX_STEPS if self.epoch < cfg.epochs else None
            if self.step_in_epoch < self.updates_per_epoch:  # else: after the epoch's checkpoint
                return STOP_MAX_STEPS
        return None

    def _count_nonfinite(self) -> None:
        """A skipped update: counted, said, and ``nonfinite_max`` of them in a row stop the run."""
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.acc.skipped += 1
        if self.dist.main:
            print(f"masksub train: non-finite {self._bad_what} at step {self.global_step} (epoch "
                  f"{self.epoch + 1}); step skipped ({self.nonfinite_run} in a row)", file=sys.stderr)

    def _stop_nonfinite(self) -> None:
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

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        main = self.dist.main
        t_start = time.perf_counter() - self.elapsed
        upe = self.updates_per_epoch
        if main:
            where = f"resuming at epoch {self.epoch + 1}, step {self.global_step}" if self.global_step else "starting"
            n_params = sum(p.numel() for p in self.model_raw.parameters()) / 1e6
            print(f"masksub train: {cfg.recipe or cfg.model} ({n_params:.2f}M params), sub={cfg.sub}"
                  f"{'' if self.ms.branch is None else f' ratio={self.ms.ratio}'}, {cfg.epochs} epochs x "
                  f"{upe} steps, {self.device.type} x{self.dist.world}; {where}; run dir {self.run_dir}",
                  file=sys.stderr)
        while self.epoch < cfg.epochs and self.stopped is None:
            ep_t0 = time.perf_counter()
            self.ms.model.train()
            if cfg.sched_step == "epoch":  # DeiT-III / RSB: the lr changes at epoch starts only
                self.scheduler.step(max(self.epoch - cfg.sched_epoch_lag, 0))
            self._it = self.train_data.iterate(self.epoch, self.step_in_epoch * cfg.accum_steps)
            bar = progress(upe, f"epoch {self.epoch + 1}/{cfg.epochs}", enabled=main and cfg.progress,
                           initial=self.step_in_epoch)
            win, win_t0 = Sums.zeros(self.device), time.perf_counter()
            while self.step_in_epoch < upe:
                stats = self._update()
                if stats is not None:
                    self.acc.add(stats)
                    win.add(stats)
                    self.nonfinite_run = 0
                else:
                    self._count_nonfinite()
                self.global_step += 1
                self.step_in_epoch += 1
                bar.update(1)
                if self.nonfinite_run >= cfg.nonfinite_max:
                    bar.close()
                    self._stop_nonfinite()
                if win.n and self.global_step % cfg.log_every == 0:
                    rec = self._log_step(win, win_t0)
                    if main and cfg.progress:
                        bar.set_postfix(loss=f"{rec['loss_main']:.3f}", lr=f"{rec['lr']:.2e}", refresh=False)
                    win, win_t0 = Sums.zeros(self.device), time.perf_counter()
                self.stopped = self._stop_reason(at_epoch_end=False)
                if self.stopped:
                    break
                if (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
                        and self.step_in_epoch < upe):
                    self.acc.time_s += time.perf_counter() - ep_t0
                    ep_t0 = time.perf_counter()
                    self.elapsed = time.perf_counter() - t_start
                    self.save()
            bar.close()
            self.acc.time_s += time.perf_counter() - ep_t0
            if self.stopped:
                break
            self._end_epoch()
            self.elapsed = time.perf_counter() - t_start
            self.saver.save_epoch_end(self._state(), is_best=bool(self.last_eval.get("is_best")),
                                      scored=self.best_weights)
            self.stopped = self._stop_reason(at_epoch_end=True)
        self.elapsed = time.perf_counter() - t_start
        if self.stopped:
            self.save()
            if main:
                print(f"masksub train: {self._stop_message()} at step {self.global_step}; checkpoint written; "
                      f"continue with: masksub train --resume {self.run_dir}", file=sys.stderr)
        return self._summary(self.stopped)

    def _stop_message(self) -> str:
        if self.stopped == STOP_SIGNAL:
            return f"stopped by {signal.Signals(self._stop_signal).name if self._stop_signal else 'a signal'}"
        return (f"stopped at max_steps={self.cfg.max_steps} (a limit of this invocation only: the resumed "
                "run trains to its last epoch unless given --max-steps again)")

    def _end_epoch(self) -> None:
        cfg = self.cfg
        acc = self.acc
        losses = torch.stack([acc.loss_main, acc.loss_sub, torch.tensor(float(acc.n), device=self.device)]).double()
        losses = D.all_sum(losses, self.dist)
        rec: dict[str, Any] = {"kind": "epoch", "epoch": self.epoch + 1, "step": self.global_step}
        if losses[2].item() == 0:  # every step skipped: no loss to report, nothing was trained
            self.save()
            raise TrainingStopped(
                f"no step of epoch {self.epoch + 1} had a finite loss or gradient ({acc.skipped} "
                f"skipped); nothing was trained in it. {self.saver.intact()} (the weights before the epoch). "
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
        if cfg.analysis and acc.gn_n:
            g = D.all_sum(torch.stack([acc.gn_main, acc.gn_sub]).double(), self.dist)
            g = g / (acc.gn_n * self.dist.world)
            rec["grad_norm_main"] = g[0].item()
            if self.ms.branch is not None and not cfg.masking_only:
                rec["grad_norm_sub"] = g[1].item()
        rec["lr"] = peak_lr(self.optimizer)
        rec["time_s"] = acc.time_s
        rec["skipped_nonfinite"] = acc.skipped
        rec["world_size"] = self.dist.world
        rec["train_steps"] = int(losses[2].item())  # updates summed over ranks
        # the better of the raw and the EMA weights, remembering which (best.pt is marked with it)
        raw, ema = rec.get("top1", -1.0), rec.get("ema_top1", -1.0)
        score, weights = (ema, "ema") if ema > raw else (raw, "model")
        rec["is_best"] = do_eval and score > self.best_top1
        if rec["is_best"]:
            self.best_top1, self.best_epoch, self.best_weights = score, self.epoch + 1, weights
            rec["best_weights"] = weights
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
        self.acc = Sums.zeros(self.device)

    def _summary(self, stopped: str | None) -> dict[str, Any]:
        ev = self.last_eval
        s = {"run_dir": str(self.run_dir), "recipe": self.cfg.recipe, "model": self.cfg.model,
             "sub": self.cfg.sub, "ratio": self.ms.ratio if self.ms.branch is not None else None,
             "masking_only": self.cfg.masking_only, "epochs_done": self.epoch, "steps": self.global_step,
             "top1": ev.get("top1"), "top5": ev.get("top5"), "ema_top1": ev.get("ema_top1"),
             "best_top1": self.best_top1 if self.best_top1 >= 0 else None, "best_epoch": self.best_epoch,
             "best_weights": self.best_weights if self.best_top1 >= 0 else None,
             "train_loss_unmasked": ev.get("train_loss_unmasked"), "train_loss_masked": ev.get("train_loss_masked"),
             "skipped_nonfinite": self.nonfinite_total, "time_s": self.elapsed, "stopped": stopped,
             "world_size": self.dist.world, "signal": self._stop_signal}
        if self.dist.main:
            (self.run_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
            if not stopped:
                top1 = "n/a" if s["top1"] is None else f"{s['top1']:.2f}%"
                top5 = "n/a" if s["top5"] is None else f"{s['top5']:.2f}%"
                which = " (EMA weights)" if s["best_weights"] == "ema" else ""
                print(f"masksub train: done: top-1 {top1}, top-5 {top5} "
                      f"(best {s['best_top1'] or 0:.2f}%{which} at epoch {self.best_epoch}), {self.epoch} epochs, "
                      f"{self.global_step} steps in {_fmt_time(self.elapsed)}; run dir {self.run_dir}")
        return s


def train(cfg: Config, *, resume: str | None = None, run_dir: str | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Build, run, tear down: the whole ``masksub train``; returns the summary dict."""
    trainer = None
    finished = False
    try:
        trainer = Trainer(cfg, resume=resume, run_dir=run_dir, overwrite=overwrite)
        summary = trainer.run()
        finished = True
        return summary
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # the DDP model goes before its process group (see D.teardown)
        D.teardown(finished)


def _lost_peer(e: BaseException) -> bool:
    """A collective that failed because another process of the run died (gloo / NCCL)."""
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("connection reset", "connection closed", "broken pipe", "connection refused"))
