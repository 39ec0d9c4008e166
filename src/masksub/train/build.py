"""The recipe's parts from timm: model, optimizer, schedule, criterion, Mixup/CutMix."""

from __future__ import annotations

import difflib
import sys
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


def build_model(cfg: Config, *, pretrained: bool = True) -> nn.Module:
    """``timm.create_model(cfg.model, pretrained=False, ...)``; weights only from a local file
    (``pretrained=False``: not even that, for a resume or an eval whose checkpoint has them all)."""
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
    if cfg.drop_path_uniform:
        uniform_drop_path(model, cfg.drop_path)
    if cfg.cls_token_init_std is not None:
        init_cls_token(model, cfg.cls_token_init_std)
    if cfg.pretrained_file and pretrained:
        from .pretrained import load_pretrained, uses_mask_token

        load_pretrained(model, cfg.pretrained_file, model_name=cfg.model, exclude=cfg.pretrained_exclude,
                        min_loaded=cfg.pretrained_min_loaded, mask_token=uses_mask_token(cfg, model),
                        verbose=_rank() == 0, pos_embed_resample=cfg.pos_embed_resample)
    if cfg.head_init_std is not None or cfg.head_init_scale is not None:
        init_head(model, cfg.head_init_std, cfg.head_init_scale)
    if cfg.freeze:
        freeze(model, cfg.freeze)
    return model


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def uniform_drop_path(model: nn.Module, rate: float) -> None:
    """Every block's drop-path at ``rate`` (DeiT-III ``models_v2.py``: ``dpr = [drop_path_rate
    for i in range(depth)]``) instead of timm's linear 0 -> rate; through timm's own slots."""
    from timm.layers import DropPath

    blocks = getattr(model, "blocks", None)
    names = ("drop_path", "drop_path1", "drop_path2")
    slots = [(b, n) for b in (blocks or []) for n in names if isinstance(getattr(b, n, None), nn.Module)]
    if not slots:
        raise MaskSubError(f"drop_path_uniform: {type(model).__name__} has no blocks with drop-path "
                           "slots (drop_path / drop_path1 / drop_path2); unset drop_path_uniform")
    for block, name in slots:
        setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


def init_cls_token(model: nn.Module, std: float) -> None:
    """DeiT-III ``models_v2.py``: ``trunc_normal_(self.cls_token, std=.02)`` (timm's deit3 draws
    it with std 1e-6). Before any pretrained weights load: a checkpoint's token wins."""
    token = getattr(model, "cls_token", None)
    if not isinstance(token, nn.Parameter):
        raise MaskSubError(f"cls_token_init_std: {type(model).__name__} has no cls_token; unset cls_token_init_std")
    with torch.no_grad():
        nn.init.trunc_normal_(token, std=std)


def init_head(model: nn.Module, std: float | None, scale: float | None) -> None:
    """The classifier's start: MAE ``main_finetune.py`` ``trunc_normal_(head.weight, std=2e-5)``;
    BEiT v2 ``modeling_finetune.py`` / FT-CLIP ``finetune_clip.py``: ``trunc_normal_(std=.02)``, then
    ``mul_(init_scale)``. A scale alone redraws the std-.02 start first: timm's ``Beit`` has already
    scaled its head by its own ``head_init_scale``, and scaling that again gave std 2e-8."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise MaskSubError(f"head_init_std / head_init_scale need a linear classifier, {type(model).__name__} "
                           f"has {type(head).__name__}")
    with torch.no_grad():
        if std is None and scale is not None:
            std = 0.02
        if std is not None:
            nn.init.trunc_normal_(head.weight, std=std)
            if head.bias is not None:
                head.bias.zero_()
        if scale is not None:
            head.weight.mul_(scale)
            if head.bias is not None:
                head.bias.mul_(scale)


def freeze(model: nn.Module, prefixes: list[str]) -> None:
    """Parameters under ``prefixes`` get no gradient (FT-CLIP freezes the patch embedding)."""
    hit = {n for n, _ in model.named_parameters() if any(n.startswith(pfx) for pfx in prefixes)}
    if not hit:
        raise MaskSubError(f"freeze: no parameter of {type(model).__name__} starts with {prefixes}")
    for n, p in model.named_parameters():
        if n in hit:
            p.requires_grad_(False)


def effective_lr(cfg: Config, world: int | None = None) -> tuple[float, float, float, str]:
    """(lr, warmup_lr, min_lr) for this run's global batch, and a note when it differs.

    ``batch_total`` is the global batch of the recipe's lr. ``lr_scale: linear`` (Swin ``main.py``:
    x batch / 512, warm-up and min lr too) scales all three; ``linear_lr`` (MAE ``main_finetune.py``:
    lr = blr x batch / 256, ``--min_lr`` as given) scales lr only; ``none`` (DeiT-III
    ``--unscale-lr``, RSB, BEiT, FT-CLIP) keeps them and says loudly that the run is not the
    published setting.
    """
    world = _world() if world is None else world
    batch = cfg.batch_size * world * cfg.accum_steps
    if not cfg.batch_total or batch == cfg.batch_total:
        return cfg.lr, cfg.warmup_lr, cfg.min_lr, ""
    where = f"global batch {batch} (batch_size {cfg.batch_size} x {world} processes x accum_steps {cfg.accum_steps})"
    if cfg.lr_scale in ("linear", "linear_lr"):
        f = batch / cfg.batch_total
        g = f if cfg.lr_scale == "linear" else 1.0
        return (cfg.lr * f, cfg.warmup_lr * g, cfg.min_lr * g,
                f"{where} != the recipe's {cfg.batch_total}: lr scaled linearly to {cfg.lr * f:.4g} "
                + ("(warm-up and min lr too)" if g != 1.0 else "(warm-up and min lr as given)")
                + ", the source's rule")
    return (cfg.lr, cfg.warmup_lr, cfg.min_lr,
            f"WARNING: {where} != the {cfg.batch_total} the recipe's lr {cfg.lr:g} is for, and its source "
            "does not rescale lr: this run is NOT the published setting. Match the batch (e.g. "
            "--accum-steps), or set lr for your batch yourself")


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``; ``layer_decay`` gives MAE/BEiT layer-wise lr decay."""
    from timm.optim import create_optimizer_v2

    kw: dict[str, Any] = {}
    if cfg.opt_eps is not None:
        kw["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kw["betas"] = tuple(cfg.opt_betas)
    lr, _, _, note = effective_lr(cfg)
    if note and _rank() == 0:
        print(f"masksub train: {note}", file=sys.stderr)
    params: Any = model
    if cfg.layer_decay_rule == "beit":  # the fine-tuning sources' own groups (param_groups.py)
        from .param_groups import beit_param_groups

        params = beit_param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.no_weight_decay)
    elif cfg.no_weight_decay is not None and cfg.weight_decay:
        from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

        skip = cfg.no_weight_decay
        params = (param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip,
                                           layer_decay=cfg.layer_decay)
                  if cfg.layer_decay is not None else
                  param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip))
    try:
        return create_optimizer_v2(params, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum,
                                   layer_decay=cfg.layer_decay if params is model else None, **kw)
    except (ValueError, AssertionError, KeyError) as e:
        raise MaskSubError(f"optimizer {cfg.opt!r}: {e}") from None


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Any:
    """Cosine (or any timm schedule) with warm-up, stepped per update or per epoch.

    ``sched_step: epoch`` is timm's ``t_in_epochs`` (the trainer calls ``step(epoch)`` at each
    epoch start; ``step_update`` is then a no-op): DeiT-III ``main.py`` and RSB ``train.py`` step
    per epoch. ``warmup_prefix`` puts the whole cosine after the warm-up (MAE ``lr_sched.py``,
    BEiT / FT-CLIP ``utils.cosine_scheduler``).
    """
    from timm.scheduler import create_scheduler_v2

    _, warmup_lr, min_lr, _ = effective_lr(cfg)
    epochs = cfg.epochs - cfg.warmup_epochs if cfg.warmup_prefix else cfg.epochs
    try:
        sched, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=warmup_lr, min_lr=min_lr, warmup_prefix=cfg.warmup_prefix,
            step_on_epochs=cfg.sched_step == "epoch", updates_per_epoch=updates_per_epoch,
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
