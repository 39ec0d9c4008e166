"""Training config: one flat dataclass, loaded from a recipe YAML, then ``--set`` / flag overrides.

Every key is checked before any work starts: an unknown key gets a close-match suggestion, a
bad value a message that names the key and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ..branches.base import MODES
from ..errors import MaskSubError, check_ratio
from ..step import ORDERS

SUBS = ("none", *MODES)
AMPS = ("none", "bf16", "fp16")
DISTS = ("ddp", "fsdp")  # under torchrun: replicate the model (DDP) or shard it (FSDP2)
AUGS = ("timm", "3aug", "3aug_src", "crop_flip", "none")
SCHED_STEPS = ("update", "epoch")
LR_SCALES = ("none", "linear", "linear_lr")
RE_MODES = ("const", "rand", "pixel")  # timm RandomErasing modes
LAYER_DECAY_RULES = ("timm", "beit")
POS_EMBED_RESAMPLES = ("timm", "bicubic")


@dataclass
class Config:
    """All trainer settings; a recipe YAML sets a subset, the rest keep these defaults."""

    # where the recipe came from
    recipe: str = ""
    source: str = ""
    # model (timm name; model_kwargs go to timm.create_model, e.g. depth, img_size)
    model: str = "vit_small_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    pretrained_file: str = ""
    pretrained_exclude: list | None = None  # key prefixes of the checkpoint left out (after mapping)
    pretrained_min_loaded: float = 0.5  # fail when less than this share of the backbone loaded
    drop_path_uniform: bool = False  # DeiT-III: the same drop-path rate in every block
    head_init_std: float | None = None  # re-initialise the classifier: trunc-normal std, bias 0 (MAE)
    head_init_scale: float | None = None  # multiply the classifier's initial weights (FT-CLIP x0.001)
    freeze: list | None = None  # parameter-name prefixes kept frozen (FT-CLIP's patch embedding)
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    drop_path: float = 0.0
    drop: float = 0.0
    # data: "synthetic", "fashion-mnist", an ImageFolder root, "hfds/NAME" or "wds/..." (timm)
    data: str = "synthetic"
    data_dir: str = ""
    train_split: str = "train"
    val_split: str = "validation"
    subset: int = 0
    val_subset: int = 0
    # which images subset / val_subset (and the analysis passes) take from an ImageFolder or an
    # indexable timm data set: a class-balanced sample drawn with this seed, not the first files
    subset_seed: int = 0
    synthetic_size: int = 512
    synthetic_val_size: int = 128
    batch_size: int = 128
    eval_batch_size: int = 0
    workers: int = 4
    # augmentation
    aug: str = "timm"
    auto_augment: str | None = None
    color_jitter: float | None = 0.4
    reprob: float = 0.0
    crop_pct: float | None = None
    crop_pad: int = 2
    hflip: float = 0.5
    interpolation: str = "bicubic"
    train_interpolation: str = ""  # "" = interpolation; RSB trains with "random"
    repeated_aug: int = 0  # repeated augmentation: each image this many times per epoch (DeiT RASampler)
    mean: list | None = None
    std: list | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    bce: bool = False
    bce_target_thresh: float | None = None
    # the sub-branch
    sub: str = "mask"
    ratio: float | None = None  # the mask ratio (sub=mask); DropSub / PathSub have their own keys below
    order: str = "memory"
    family: str | None = None
    family_options: dict = field(default_factory=dict)
    masking_only: bool = False
    # the sub-branch's strength for the two other modes (each its own key, so that a recipe's
    # mask ratio never becomes a dropout p or a drop-path increase); the paper's Table 13 values
    dropsub_p: float = 0.2  # sub=dropout: p of the residual-branch dropouts in the sub forward
    pathsub_delta: float = 0.1  # sub=droppath: added to every drop-path rate in the sub forward
    # optimisation
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float | None = None
    opt_betas: list | None = None
    layer_decay: float | None = None
    sched: str = "cosine"
    epochs: int = 100
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    warmup_prefix: bool = False  # warm-up, then the whole cosine over the remaining epochs (MAE/BEiT)
    sched_step: str = "update"  # "epoch": the lr changes once per epoch (DeiT-III, RSB)
    sched_epoch_lag: int = 0  # epoch e runs at the lr of e - lag (DeiT's main.py steps after each epoch: 1)
    batch_total: int = 0  # the global batch the recipe's lr is for (0: not stated)
    lr_scale: str = "none"  # how lr follows a different global batch: linear (MAE, Swin) or none
    min_lr: float = 1e-6
    clip_grad: float | None = None
    accum_steps: int = 1
    ema: bool = False
    ema_decay: float = 0.9998
    # speed
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    threads: int = 0
    dist: str = "ddp"
    fsdp_activation_checkpointing: bool = False
    fsdp_sync_main: bool = False  # reduce-scatter after the main backward too: less memory, 2x reduce
    # run
    seed: int = 0
    output: str = "runs"
    run_name: str = ""
    log_every: int = 50
    eval_every: int = 1
    checkpoint_every: int = 0
    max_steps: int = 0
    nonfinite_max: int = 5
    analysis: bool = False
    analysis_subset: int = 2048
    grad_norm_every: int = 20
    tensorboard: bool = True
    progress: bool = True
    # fidelity to the recipes' sources: how each value is applied, as the source applies it
    re_mode: str = "const"  # random erasing fill: timm's default "const"; the ImageNet sources use "pixel"
    re_count: int = 1  # random erasing boxes per image (timm / the sources: 1)
    layer_decay_rule: str = "timm"  # "beit": BEiT's get_num_layer_for_vit (MAE lr_decay.py, FT-CLIP too)
    no_weight_decay: list | None = None  # parameter names without weight decay (null: the model's own list)
    cls_token_init_std: float | None = None  # re-initialise cls_token: trunc-normal std (DeiT models_v2.py .02)
    pos_embed_resample: str = "timm"  # a pretrained pos_embed of another size: timm's or plain bicubic (DeiT)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = get_type_hints(Config)


def recipe_dirs() -> list[Path]:
    """Where recipes live: $MASKSUB_RECIPES, the repo's ``recipes/``, then the package's copy."""
    here = Path(__file__).resolve()
    dirs = [here.parents[3] / "recipes", here.parents[1] / "recipes"]
    if os.environ.get("MASKSUB_RECIPES"):
        dirs.insert(0, Path(os.environ["MASKSUB_RECIPES"]))
    return [d for d in dirs if d.is_dir()]


def recipe_names() -> list[str]:
    names: set[str] = set()
    for d in recipe_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_recipe(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise MaskSubError(f"recipe file {name} does not exist")
        return p
    for d in recipe_dirs():
        cand = d / f"{name}.yaml"
        if cand.is_file():
            return cand
    names = recipe_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise MaskSubError(f"unknown recipe {name!r}{hint} Known recipes: {', '.join(names)}")


def _unknown_key(key: str, where: str) -> MaskSubError:
    close = difflib.get_close_matches(key, FIELDS, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return MaskSubError(f"unknown config key {key!r} in {where}{hint} (run `masksub train --list-keys`)")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where (PyYAML's own text spans several)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or ' '.join(str(e).split())}{where}"


def _coerce(key: str, value: Any, where: str) -> Any:
    """Turn a YAML / command-line value into the field's type, or say why it cannot be."""
    hint = _HINTS[key]
    args = get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    base = get_origin(base) or base
    if isinstance(value, str) and base is not str:
        if value.lower() in ("none", "null", "~", ""):
            value = None
        else:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise MaskSubError(f"{where}: cannot read value {value!r} for {key}: {_yaml_problem(e)}") from None
    if value is None:
        if optional:
            return None
        if base is str:
            return ""
        raise MaskSubError(f"{where}: {key} cannot be empty; give a {base.__name__}")
    try:
        if base is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            return str(value)
        if base is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if base is list:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return list(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise MaskSubError(f"{where}: {key} must be of type {base.__name__}, got {value!r}")


def apply(cfg: Config, values: dict[str, Any], where: str) -> Config:
    for k, v in values.items():
        if k not in FIELDS:
            raise _unknown_key(k, where)
        setattr(cfg, k, _coerce(k, v, where))
    return cfg


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "model_kwargs.depth=2"]`` -> dict; dotted keys go into dict fields."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise MaskSubError(f"--set takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if "." in k:
            top, sub = k.split(".", 1)
            if top not in FIELDS or _HINTS[top] is not dict:
                raise _unknown_key(top, "--set") if top not in FIELDS else MaskSubError(
                    f"--set {k}: {top} is not a mapping; use --set {top}=VALUE")
            out.setdefault(top, {})[sub] = yaml.safe_load(v)
        else:
            out[k] = v
    return out


def load(recipe: str | None, overrides: dict[str, Any] | None = None, *, check_paths: bool = True) -> Config:
    """Defaults <- recipe YAML <- overrides (already parsed); then validated (``check_paths``:
    the data path must exist too)."""
    cfg = Config()
    if recipe:
        path = find_recipe(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise MaskSubError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise MaskSubError(f"recipe {path} must be a mapping of key: value")
        data.setdefault("recipe", path.stem)
        apply(cfg, data, f"recipe {path}")
    for k, v in (overrides or {}).items():
        if k in FIELDS and _HINTS[k] is dict and isinstance(v, dict):
            merged = dict(getattr(cfg, k))
            merged.update(v)
            v = merged
        apply(cfg, {k: v}, "the command line")
    validate(cfg, check_paths=check_paths)
    return cfg


def from_dict(values: dict[str, Any]) -> Config:
    """A config saved in a run directory or checkpoint (keys this version lacks are refused)."""
    values = dict(values)
    # saved before the per-mode keys: its ``ratio`` was the dropout p / drop-path increase it ran at
    if values.get("ratio") is not None and "dropsub_p" not in values and "pathsub_delta" not in values:
        key = {"dropout": "dropsub_p", "droppath": "pathsub_delta"}.get(values.get("sub", ""))
        if key:
            values[key] = values["ratio"]
    cfg = apply(Config(), values, "the saved config")
    validate(cfg)
    return cfg


STRENGTH_KEYS = {"mask": "ratio", "dropout": "dropsub_p", "droppath": "pathsub_delta"}


def sub_strength(cfg: Config) -> float | None:
    """The strength the sub-branch runs at for ``cfg.sub``: mask ratio, dropout p or drop-path
    increase (None: no sub-branch, or a mask ratio left to the family's default)."""
    key = STRENGTH_KEYS.get(cfg.sub)
    return None if key is None else getattr(cfg, key)


def describe_sub(cfg: Config) -> str:
    """One line on what the sub-branch will do, for ``--show`` and logs."""
    if cfg.sub == "none":
        return "sub-branch: none (standard training, Eq. (1))"
    if cfg.sub == "mask":
        r = "the family's default (0.5)" if cfg.ratio is None else f"{cfg.ratio:g}"
        what = "masking on the only branch (Eq. (2))" if cfg.masking_only else "MaskSub"
        return f"sub-branch: mask ({what}), mask ratio {r} (key ratio)"
    if cfg.sub == "dropout":
        return (f"sub-branch: dropout (DropSub), residual-branch dropout p {cfg.dropsub_p:g} in the sub forward "
                "(key dropsub_p; the paper's Table 13 uses 0.2)")
    return (f"sub-branch: droppath (PathSub), every drop-path + {cfg.pathsub_delta:g} in the sub forward "
            f"(key pathsub_delta; the paper's Table 13 uses + 0.1); main drop_path {cfg.drop_path:g}")


def _check_numbers(cfg: Config) -> None:
    """No inf / NaN anywhere (they pass every range check and train NaN weights), a seed numpy
    takes for every rank, mean / std with one entry per channel and std > 0."""
    for key, value in cfg.to_dict().items():
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise MaskSubError(f"{key} must be a finite number, got {value!r}")
    if not 0 <= cfg.seed < 2**31:
        raise MaskSubError(f"seed must be in [0, 2**31), got {cfg.seed}")
    for key in ("mean", "std"):
        v = getattr(cfg, key)
        if v is None:
            continue
        if len(v) != cfg.in_chans or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise MaskSubError(f"{key} needs one number per input channel (in_chans={cfg.in_chans}), got {v!r}")
        if key == "std" and min(v) <= 0:
            raise MaskSubError(f"std must be > 0 for every channel (the input is divided by it), got {v!r}")


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Every check that needs no model or data: ranges, choices, combinations."""
    _check_numbers(cfg)
    def choice(key: str, options: tuple[str, ...]) -> None:
        v = getattr(cfg, key)
        if v not in options:
            close = difflib.get_close_matches(str(v), options, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MaskSubError(f"{key} must be one of {', '.join(options)}, got {v!r}{hint}")

    choice("sub", SUBS)
    choice("amp", AMPS)
    choice("dist", DISTS)
    if cfg.dist == "fsdp":
        from .fsdp import check_config

        check_config(cfg)
    choice("aug", AUGS)
    choice("order", ORDERS)
    choice("sched_step", SCHED_STEPS)
    choice("lr_scale", LR_SCALES)
    choice("re_mode", RE_MODES)
    choice("layer_decay_rule", LAYER_DECAY_RULES)
    choice("pos_embed_resample", POS_EMBED_RESAMPLES)
    if cfg.re_count < 1:
        raise MaskSubError(f"re_count is the number of erased boxes per image (>= 1), got {cfg.re_count}")
    if cfg.cls_token_init_std is not None and cfg.cls_token_init_std <= 0:
        raise MaskSubError(f"cls_token_init_std must be > 0 (or null to keep the model's init), got {cfg.cls_token_init_std}")
    if cfg.repeated_aug < 0 or cfg.repeated_aug == 1:
        raise MaskSubError(f"repeated_aug is the number of repeats (0 = off, e.g. 3), got {cfg.repeated_aug}")
    if cfg.sched_epoch_lag < 0 or (cfg.sched_epoch_lag and cfg.sched_step != "epoch"):
        raise MaskSubError("sched_epoch_lag needs sched_step: epoch and must be >= 0, got "
                           f"{cfg.sched_epoch_lag}")
    if cfg.batch_total < 0:
        raise MaskSubError(f"batch_total must be >= 0, got {cfg.batch_total}")
    if not 0.0 <= cfg.pretrained_min_loaded <= 1.0:
        raise MaskSubError(f"pretrained_min_loaded must be in [0, 1], got {cfg.pretrained_min_loaded}")
    if cfg.warmup_prefix and cfg.warmup_epochs >= cfg.epochs:
        raise MaskSubError(f"warmup_prefix: warmup_epochs ({cfg.warmup_epochs}) must be < epochs ({cfg.epochs})")
    if cfg.ratio is not None:  # checked in every mode, though only sub=mask uses it
        check_ratio(cfg.ratio, "ratio (the mask ratio)")
    check_ratio(cfg.dropsub_p, "dropsub_p (DropSub's dropout p in the sub-branch)")
    check_ratio(cfg.pathsub_delta, "pathsub_delta (PathSub's drop-path increase in the sub-branch)")
    if cfg.masking_only and cfg.sub != "mask":
        raise MaskSubError("masking_only trains the single branch on masked input: it needs sub=mask")
    for key in ("drop_path", "drop", "reprob", "label_smoothing", "hflip"):
        v = getattr(cfg, key)
        if not 0.0 <= v < 1.0 and not (key == "hflip" and v == 1.0):
            raise MaskSubError(f"{key} must be in [0, 1), got {v}")
    for key in ("batch_size", "epochs", "num_classes", "img_size", "in_chans", "accum_steps",
                "log_every", "eval_every", "nonfinite_max", "grad_norm_every"):
        if getattr(cfg, key) < 1:
            raise MaskSubError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("subset", "val_subset", "max_steps", "checkpoint_every", "workers", "threads",
                "eval_batch_size", "synthetic_size", "synthetic_val_size", "crop_pad"):
        if getattr(cfg, key) < 0:
            raise MaskSubError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.subset_seed < 0:
        raise MaskSubError(f"subset_seed must be >= 0, got {cfg.subset_seed}")
    if cfg.lr <= 0:
        raise MaskSubError(f"lr must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0 or cfg.warmup_epochs < 0 or cfg.min_lr < 0:
        raise MaskSubError("weight_decay, warmup_epochs and min_lr must be >= 0")
    if cfg.layer_decay is not None and not 0.0 < cfg.layer_decay <= 1.0:
        raise MaskSubError(f"layer_decay must be in (0, 1], got {cfg.layer_decay}")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise MaskSubError(f"clip_grad must be > 0 (or null for none), got {cfg.clip_grad}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise MaskSubError(f"ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise MaskSubError(f"Mixup/CutMix needs an even batch_size, got {cfg.batch_size}")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise MaskSubError("mixup and cutmix alphas must be >= 0")
    if cfg.masking_only and cfg.analysis and cfg.order == "fused":
        raise MaskSubError("analysis gradient norms need order=memory")
    if cfg.analysis and cfg.order == "fused" and cfg.sub != "none":
        raise MaskSubError("analysis: true measures per-branch gradient norms; it needs order=memory")
    if check_paths and cfg.data not in ("synthetic", "fashion-mnist") and not cfg.data.startswith(("hfds/", "hfids/", "wds/", "tfds/")):
        if not Path(cfg.data).expanduser().exists():
            raise MaskSubError(
                f"data path {cfg.data} does not exist; give an ImageFolder root (with train/ and "
                "validation/ or val/ folders), 'fashion-mnist', 'synthetic', or a timm dataset "
                "spec like hfds/NAME or wds/NAME with data_dir="
            )
