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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

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


__all__ = ["LightningMaskSub"]
