"""MaskSub in a PyTorch Lightning ``LightningModule``: one object built in ``__init__``, one call
in ``training_step``.

>>> class Lit(pl.LightningModule):
...     def __init__(self):
...         super().__init__()
...         self.net = timm.create_model("vit_tiny_patch16_224", num_classes=10)
...         self.masksub = LightningMaskSub(self, self.net, ratio=0.5)   # before the optimizer
...     def training_step(self, batch, i):
...         x, y = batch
...         return self.masksub.loss(x, y, F.cross_entropy)              # automatic optimization

``loss`` returns the weighted loss of both branches (order fused): Lightning's own backward,
accumulation (``accumulate_grad_batches``), precision plugin, clipping and DDP gradient
synchronisation (once: both forwards run inside the one DDP forward of ``training_step``) apply
unchanged. With manual optimization (``self.automatic_optimization = False``), ``backward``
runs the memory order through ``manual_backward``: main backward first, without gradient
synchronisation (``trainer.strategy.block_backward_sync``), then the sub backward, synchronised
once. Both log ``loss_main`` and ``loss_sub``. No state of its own: Lightning's checkpoints and
resume are those of the module (a mask token, where the family adds one, is a parameter of the
network, built here before ``configure_optimizers``).

The random masks are drawn from the global torch RNG, which Lightning's checkpoints do not hold:
a resumed run draws other masks than the uninterrupted one. ``RNGCheckpoint`` (a callback) puts
the torch, CUDA, numpy and Python RNG states in the checkpoint and sets them back on resume, so a
run resumed from a checkpoint taken at the end of an epoch repeats the uninterrupted run step by
step. Resuming mid-epoch is Lightning's own limit: a plain ``DataLoader`` starts its epoch again
from the first batch (only a stateful loader resumes where it stopped).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ..errors import MaskSubError
from ..step import MaskSub, StepOutput


class LightningMaskSub:
    """MaskSub for a LightningModule ``module`` whose network is ``model`` (default: the module).

    The keywords are :class:`masksub.MaskSub`'s (mode, ratio, family, kind, weights, ...).
    ``log=False`` leaves logging to the caller (the branch losses are in the returned output /
    ``self.last``).
    """

    def __init__(self, module: nn.Module, model: nn.Module | None = None, *, log: bool = True,
                 **masksub_kwargs: Any) -> None:
        if not hasattr(module, "manual_backward") or not hasattr(module, "log"):
            raise MaskSubError(f"LightningMaskSub takes the LightningModule first, got {type(module).__name__}")
        if "amp_dtype" in masksub_kwargs:
            raise MaskSubError("with Lightning, set the precision on the Trainer (precision='bf16-mixed'); "
                               "its plugin runs training_step under autocast")
        self._module = [module]  # a list: not registered as a submodule (the module holds this object)
        self.masksub = MaskSub(module if model is None else model, **masksub_kwargs)
        self.log_losses = log
        self.last: StepOutput | None = None

    @property
    def module(self) -> Any:
        return self._module[0]

    def loss(self, x: Any, y: Any, criterion: Callable[[Tensor, Any], Tensor]) -> Tensor:
        """Automatic optimization: the combined loss (order fused), for ``training_step`` to return."""
        if not self.module.automatic_optimization:
            raise MaskSubError("loss() is for automatic optimization; with automatic_optimization = False call "
                               "backward(x, y, criterion), then step the optimizer")
        loss = self.masksub.loss(x, y, criterion)
        self.last = self.masksub.last
        self._log(self.last)
        return loss

    def backward(self, x: Any, y: Any, criterion: Callable[[Tensor, Any], Tensor], *, sync: bool = True,
                 loss_scale: float = 1.0) -> StepOutput:
        """Manual optimization: both backward passes (order of the MaskSub, default memory) through
        ``manual_backward``; the main one without gradient synchronisation. ``sync=False`` (and
        ``loss_scale``) for a micro-batch that is not the last of an accumulation."""
        module = self.module
        if module.automatic_optimization:
            raise MaskSubError("backward() is for manual optimization (self.automatic_optimization = False); "
                               "with automatic optimization return loss(x, y, criterion) from training_step")
        trainer = getattr(module, "_trainer", None)
        strategy = getattr(trainer, "strategy", None)
        # a parallel strategy's switch (DDP no_sync); a single-device strategy has none
        no_sync = getattr(strategy, "block_backward_sync", None) or contextlib.nullcontext
        out = self.masksub.backward(x, y, criterion, backward_fn=module.manual_backward, no_sync=no_sync,
                                    sync=sync, loss_scale=loss_scale)
        self.last = out
        self._log(out)
        return out

    def _log(self, out: StepOutput) -> None:
        if not self.log_losses or getattr(self.module, "_trainer", None) is None:
            return
        self.module.log("loss_main", out.loss_main, prog_bar=True)
        if out.loss_sub is not None:
            self.module.log("loss_sub", out.loss_sub)


class RNGCheckpoint(pl.Callback):
    """Saves the global RNG states (torch, CUDA, numpy, Python) in Lightning's checkpoint and sets
    them back on resume, so the masks (and the loader's seeds) continue the uninterrupted run's
    stream. Under DDP the checkpoint holds the states of the rank that writes it (rank 0), and
    every rank resumes from them (as after ``seed_everything``, where all ranks start alike)."""

    @property
    def state_key(self) -> str:
        return "RNGCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        # tensors and plain numbers only: Lightning loads checkpoints with torch.load(weights_only=True)
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        version, py_state, py_gauss = random.getstate()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                "python": [version, list(py_state), py_gauss]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, py_state, py_gauss = state_dict["python"]
        random.setstate((version, tuple(py_state), py_gauss))


__all__ = ["LightningMaskSub", "RNGCheckpoint"]
