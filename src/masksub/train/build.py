"""The recipe's parts from timm: model, optimizer, schedule, criterion, Mixup/CutMix."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MaskSubError
from .config import Config


def check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    if not close:
        stem = name.split("_")[0]
        close = [n for n in names if n.startswith(stem)][:4]
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise MaskSubError(f"timm does not know the model {name!r}{hint} (see timm.list_models())")


def build_model(cfg: Config) -> nn.Module:
    """``timm.create_model(cfg.model, pretrained=False, ...)``; weights only from a local file."""
    import timm

    check_model_name(cfg.model)
    kw: dict[str, Any] = dict(num_classes=cfg.num_classes, in_chans=cfg.in_chans,
                              drop_rate=cfg.drop, drop_path_rate=cfg.drop_path)
    kw.update(cfg.model_kwargs)
    try:
        model = timm.create_model(cfg.model, pretrained=False, img_size=cfg.img_size, **kw)
    except TypeError as e:
        if "img_size" not in str(e):
            raise MaskSubError(f"model {cfg.model}: {e}; check model_kwargs") from None
        try:  # CNNs take any size and have no img_size argument
            model = timm.create_model(cfg.model, pretrained=False, **kw)
        except TypeError as e2:
            raise MaskSubError(f"model {cfg.model}: {e2}; check model_kwargs") from None
    if cfg.pretrained_file:
        load_pretrained(model, cfg.pretrained_file)
    return model


def load_pretrained(model: nn.Module, path: str) -> None:
    """Finetuning start: a local state dict; the classifier and mismatched shapes are skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MaskSubError(f"pretrained_file {path} does not exist")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise MaskSubError(f"cannot read pretrained_file {path}: {e}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    own = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not keep:
        raise MaskSubError(f"pretrained_file {path} shares no tensor with {type(model).__name__}")
    model.load_state_dict(keep, strict=False)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``; ``layer_decay`` gives MAE/BEiT layer-wise lr decay."""
    from timm.optim import create_optimizer_v2

    kw: dict[str, Any] = {}
    if cfg.opt_eps is not None:
        kw["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kw["betas"] = tuple(cfg.opt_betas)
    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, layer_decay=cfg.layer_decay, **kw)
    except (ValueError, AssertionError, KeyError) as e:
        raise MaskSubError(f"optimizer {cfg.opt!r}: {e}") from None


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Any:
    """Cosine (or any timm schedule) with warm-up, stepped per update."""
    from timm.scheduler import create_scheduler_v2

    try:
        sched, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
    except (ValueError, AssertionError) as e:
        raise MaskSubError(f"schedule {cfg.sched!r}: {e}") from None
    if sched is None:
        raise MaskSubError(f"unknown schedule {cfg.sched!r}; use cosine, step, tanh, poly or plateau")
    return sched


def build_mixup(cfg: Config) -> Any:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=cfg.num_classes)


def build_criterion(cfg: Config) -> nn.Module:
    """The recipe's training loss: BCE (RSB / DeiT-III), soft-target CE (Mixup), smoothed CE."""
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.bce:
        return BinaryCrossEntropy(target_threshold=cfg.bce_target_thresh,
                                  smoothing=0.0 if (cfg.mixup or cfg.cutmix) else cfg.label_smoothing)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return nn.CrossEntropyLoss()


def label_criterion(cfg: Config) -> nn.Module:
    """The loss on plain labels, for validation and the train-loss analysis (Eq. 1 / Eq. 2)."""
    if cfg.bce:
        from timm.loss import BinaryCrossEntropy

        return BinaryCrossEntropy(smoothing=0.0)
    return nn.CrossEntropyLoss()
