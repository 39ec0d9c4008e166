"""The paper's Figure 2 quantities, measured the same way for every setting and every family.

Figure 2 (Sec. 3.2) compares standard training (Eq. 1), masking (Eq. 2) and MaskSub on
(b) the train loss without masking, Eq. (1), (c) the train loss with 50% masking, Eq. (2), and
(d) the gradient norm of each branch: "the gradient magnitude from the main-branch (MaskSub-Main)
is similar to that of other training". For (d) to put the baseline and MaskSub-Main on one axis,
each curve is the norm of the gradient of that branch's own loss, unweighted:

- baseline: ``||grad Eq. (1)||``; masking only: ``||grad Eq. (2)||``;
- MaskSub main: ``||grad Eq. (1)||`` (MaskSub trains on it x 0.5: the weight is divided out);
- MaskSub sub: ``||grad Eq. (3)||`` (also x 0.5 in training, divided out).

With gradient accumulation every micro-batch is measured (not only the last) and the
``1 / accum_steps`` loss scale is divided out: the value of an update is the mean of its
micro-batches' norms. The step measures the norm of what each backward added to ``.grad``
(``MaskSub.backward(grad_norms=True)``); this module only puts those numbers on one scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError

SUB_NAMES = {"mask": "MaskSub", "dropout": "DropSub", "droppath": "PathSub"}

def curve_names(sub: str | None, masking_only: bool = False) -> tuple[str, str | None]:
    """What a run's ``grad_norm_main`` / ``grad_norm_sub`` curves are (sub None: no sub curve)."""
    if masking_only:
        return "|grad Eq. (2)|, masking", None
    if sub in (None, "none"):
        return "|grad Eq. (1)|, standard", None
    name = SUB_NAMES.get(str(sub), str(sub))
    return f"|grad Eq. (1)|, {name} main", f"|grad Eq. (3)|, {name} sub"


class GradNormMeter:
    """The Figure 2d norms of one update, summed over its micro-batches."""

    def __init__(self, step_ms: Any, device: torch.device) -> None:
        two = step_ms.branch is not None
        self.w_main = float(step_ms.main_weight) if two else 1.0
        self.w_sub = float(step_ms.sub_weight) if two else None
        self.main = torch.zeros((), device=device)
        self.sub = torch.zeros((), device=device) if two else None
        self.n = 0

    def add(self, out: Any, loss_scale: float) -> None:
        """One micro-batch's ``StepOutput`` (from ``backward(grad_norms=True, loss_scale=...)``)."""
        if out.grad_norm_main is None:
            raise MaskSubError("analysis: the step returned no gradient norm; it needs grad_norms=True")
        self.main += out.grad_norm_main.detach().to(self.main.device).float() / (self.w_main * loss_scale)
        if self.sub is not None and out.grad_norm_sub is not None:
            self.sub += out.grad_norm_sub.detach().to(self.sub.device).float() / (self.w_sub * loss_scale)
        self.n += 1

    def result(self) -> tuple[Tensor | None, Tensor | None]:
        """(main, sub) for the update: the mean over its micro-batches (sub None: one branch)."""
        if not self.n:
            return None, None
        return self.main / self.n, (self.sub / self.n if self.sub is not None else None)


@contextlib.contextmanager
def root_training(model: nn.Module, branch: Any) -> Iterator[None]:
    """In the eval-mode loss analysis, set the root module's own ``training`` flag (not its
    children's: dropout and drop-path stay off) for a family that masks only in training."""
    if not getattr(branch, "masks_in_training_only", False):
        yield
        return
    was = model.training
    model.training = True
    try:
        yield
    finally:
        model.training = was


def masked_forward(ams: Any, model: nn.Module, x: Any) -> Tensor:
    """The analysis's Eq. (2) forward: the 50% sub-branch on ``x`` with the model in eval()."""
    with root_training(model, ams.branch):
        return ams.forward_sub(x)


@torch.no_grad()
def check(ams: Any, model: nn.Module, probe: Tensor) -> None:
    """Run the analysis's two forwards once on a probe image, in eval() as at each epoch's end:
    a family it cannot measure is refused now, before any training, not after an epoch."""
    was = model.training
    rng = torch.get_rng_state()  # the probe's mask must not shift the training's random stream
    rng_cuda = torch.cuda.get_rng_state(probe.device) if probe.device.type == "cuda" else None
    model.eval()
    try:
        ams.forward_main(probe)
        masked_forward(ams, model, probe)
    except MaskSubError as e:
        raise MaskSubError(f"analysis: the loss analysis cannot run on {type(model).__name__}: {e}. "
                           "Train without --analysis") from None
    finally:
        model.train(was)
        torch.set_rng_state(rng)
        if rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, probe.device)
