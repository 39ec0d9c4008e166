"""Finetuning starts: a local checkpoint into a timm model, with a report of what loaded.

The layouts met in the paper's recipes are mapped to timm names: a ``model`` / ``state_dict`` /
``module`` wrapper, a ``module.`` (DDP) or ``visual.`` (open_clip trunk) prefix, a masksub
checkpoint (its ``model``), and whatever the model's own timm ``checkpoint_filter_fn`` converts
(OpenAI CLIP ``visual.*``, DeiT-III ``gamma_*`` LayerScale, position embeddings resampled to the
run's image size, BEiT relative-position tables). A checkpoint's ``mask_token`` (BEiT v2
pretraining) becomes the sub-branch's mask token. Too little of the backbone loaded is an error.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MaskSubError

TOKEN_FAMILIES = ("beit", "vit_token")


@dataclass
class LoadReport:
    """What a ``pretrained_file`` gave the model (counts are tensors, ``fraction`` parameters)."""

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    fraction: float = 0.0  # share of the backbone's parameters (classifier excluded) that loaded
    mask_token: bool = False

    def line(self) -> str:
        def few(keys: list[str]) -> str:
            return (": " + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")) if keys else ""

        return (f"pretrained_file {self.path} ({self.layout}): loaded {len(self.loaded)} tensors "
                f"({100 * self.fraction:.1f}% of the backbone's parameters), missing {len(self.missing)}"
                f"{few(self.missing)}; unexpected {len(self.unexpected)}{few(self.unexpected)}; shape "
                f"mismatch {len(self.mismatched)}{few(self.mismatched)}"
                + ("; mask_token -> the sub-branch's mask token" if self.mask_token else ""))


def read(path: str) -> dict[str, Tensor]:
    p = Path(path).expanduser()
    if p.is_dir():  # a masksub run directory: its last checkpoint (the DeiT-III 224 stage starts so)
        p = p / "last.pt"
    if not p.is_file():
        raise MaskSubError(f"pretrained_file {p} does not exist (give a checkpoint file or a masksub run directory)")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise MaskSubError(f"cannot read pretrained_file {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(sd, dict):
        raise MaskSubError(f"pretrained_file {path} is not a state dict (got {type(sd).__name__})")
    return sd


def _unwrap(sd: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    how: list[str] = []
    if sd.get("format") == "masksub-checkpoint":
        how.append("masksub checkpoint")
    for key in ("model", "state_dict", "module"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            how.append(f"[{key!r}]")
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            how.append(f"{prefix!r} stripped")
    return sd, how


def _expand_shared_rel_pos(sd: dict[str, Tensor], model: nn.Module) -> list[str]:
    """BEiT pretraining shares one relative-position table; fine-tuning gives each block a copy
    (unilm ``beit2/run_class_finetuning.py``: "Expand the shared relative position embedding")."""
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared not in sd or getattr(model, "rel_pos_bias", None) is not None:
        return []
    blocks = getattr(model, "blocks", [])
    if not blocks or not hasattr(getattr(blocks[0], "attn", None), "relative_position_bias_table"):
        return []
    table = sd.pop(shared)
    for i in range(len(blocks)):
        sd[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return ["shared relative-position table copied to every block"]


def resample_pos_embed_bicubic(sd: dict[str, Tensor], model: nn.Module) -> list[str]:
    """DeiT ``main.py`` (``--finetune``): the patch part of ``pos_embed`` on a square grid through
    ``F.interpolate(mode='bicubic', align_corners=False)``, the extra (class) tokens kept."""
    v, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if v is None or not isinstance(own, Tensor) or num_patches is None or v.shape == own.shape:
        return []
    extra = own.shape[-2] - num_patches
    old = int(round((v.shape[-2] - extra) ** 0.5))
    new = int(round(num_patches ** 0.5))
    if old * old != v.shape[-2] - extra or new * new != num_patches:
        return []  # not square grids: left to timm's filter
    tokens = v[:, extra:].reshape(-1, old, old, v.shape[-1]).permute(0, 3, 1, 2).float()
    tokens = torch.nn.functional.interpolate(tokens, size=(new, new), mode="bicubic", align_corners=False)
    sd["pos_embed"] = torch.cat([v[:, :extra], tokens.permute(0, 2, 3, 1).flatten(1, 2).to(v.dtype)], dim=1)
    return [f"pos_embed resampled {old}x{old} -> {new}x{new} (bicubic, as DeiT main.py)"]


def timm_filter(model_name: str, model: nn.Module, sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """The model's own timm ``checkpoint_filter_fn`` (module of its entrypoint), if it has one."""
    try:
        import timm.models._registry as reg

        module = sys.modules[reg.model_entrypoint(model_name).__module__]
    except Exception:  # noqa: BLE001 - not a timm name: no filter
        return sd, ""
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return sd, ""
    kw: dict[str, Any] = {}
    if any(re.search(r"(^|\.)gamma_\d$", k) for k in sd) and hasattr(getattr(model, "blocks", [None])[0], "ls1"):
        kw["adapt_layer_scale"] = True  # DeiT-III's own checkpoints: gamma_1 -> ls1.gamma
    try:
        return fn(dict(sd), model, **kw), f"{module.__name__}.checkpoint_filter_fn"
    except Exception as e:  # noqa: BLE001 - a layout the filter does not know: load as is
        return sd, f"{module.__name__}.checkpoint_filter_fn failed ({type(e).__name__}), keys as is"


def _classifier_keys(model: nn.Module, own: dict[str, Tensor]) -> set[str]:
    names: list[str] = []
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    clf = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(clf, str):
        names.append(clf)
    elif isinstance(clf, (list, tuple)):
        names.extend(clf)
    names += ["head", "fc", "classifier", "head.fc"]
    return {k for k in own for n in names if k.startswith(n + ".")}


def load_pretrained(model: nn.Module, path: str, *, model_name: str = "", exclude: list[str] | None = None,
                    min_loaded: float = 0.5, mask_token: bool = False, verbose: bool = True,
                    pos_embed_resample: str = "timm") -> LoadReport:
    """Load ``path`` into ``model`` (non-strict), report it, and refuse a start that is mostly random.

    ``pos_embed_resample="bicubic"``: a position embedding of another grid is resampled as DeiT
    ``main.py`` does it (plain ``F.interpolate`` bicubic, ``align_corners=False``), before timm's
    filter (antialiased) would."""
    raw, how = _unwrap(read(path))
    token = raw.pop("mask_token", None)
    how += _expand_shared_rel_pos(raw, model)
    if pos_embed_resample == "bicubic":
        how += resample_pos_embed_bicubic(raw, model)
    sd, filt = timm_filter(model_name, model, raw) if model_name else (raw, "")
    if filt:
        how.append(filt)
    own = model.state_dict()
    if not any(k in own for k in sd):
        for prefix in ("visual.trunk.", "visual.", "encoder.", "backbone."):
            stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if any(k in own for k in stripped):
                sd = stripped
                how.append(f"{prefix!r} stripped")
                break
    for prefix in exclude or []:
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    rep = LoadReport(path=path, layout=", ".join(how) or "timm names")
    keep: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k not in own:
            rep.unexpected.append(k)
        elif own[k].shape != v.shape:
            rep.mismatched.append(f"{k} {tuple(v.shape)}->{tuple(own[k].shape)}")
        else:
            keep[k] = v
    rep.loaded = sorted(keep)
    rep.missing = [k for k in own if k not in keep]
    clf = _classifier_keys(model, own)
    backbone = {k: v.numel() for k, v in own.items() if k not in clf and v.is_floating_point()}
    total = sum(backbone.values()) or 1
    rep.fraction = sum(n for k, n in backbone.items() if k in keep) / total
    if rep.fraction < min_loaded:
        raise MaskSubError(
            f"{rep.line()}. Only {100 * rep.fraction:.1f}% of {type(model).__name__}'s backbone would be "
            f"loaded (needed: {100 * min_loaded:.0f}%): the checkpoint is for another model or in a layout "
            "masksub does not map. Check model / img_size against the checkpoint, map its keys to timm "
            "names, or lower pretrained_min_loaded if a partial start is what you want")
    model.load_state_dict(keep, strict=False)
    if mask_token and token is not None:
        from ..branches.mask_token import TOKEN_NAME

        dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
        if token.numel() != dim:
            raise MaskSubError(f"pretrained_file {path}: mask_token has {token.numel()} values, the "
                               f"model's tokens {dim}; it cannot be the sub-branch's mask token")
        ref = next(model.parameters())
        model.register_parameter(TOKEN_NAME, nn.Parameter(token.detach().reshape(-1).to(ref)))
        rep.mask_token = True
    if verbose:
        print(f"masksub train: {rep.line()}", file=sys.stderr)
    return rep


def uses_mask_token(cfg: Any, model: nn.Module) -> bool:
    """Whether this run's sub-branch puts a mask token in (so a pretrained one should be it)."""
    if cfg.sub != "mask":
        return False
    if cfg.family:
        return cfg.family in TOKEN_FAMILIES
    return type(model).__name__ == "Beit"
