"""Optimizer parameter groups as the fine-tuning sources build them: lr scale and weight decay
per parameter.

timm's ``param_groups_layer_decay`` groups by the model's ``group_matcher``: it puts the final
``norm`` with the last block and a parameter it does not know (the sub-branch's mask token) at
the top. BEiT's ``optim_factory.get_num_layer_for_vit`` (unilm beit2, copied by MAE
``util/lr_decay.py`` and FT-CLIP ``optim_factory.py``) decides otherwise: the stem and the mask
token are layer 0, block i is layer i + 1, everything else (final norm, fc_norm, head) the top
layer at scale 1.0. Its weight decay skips 1-D tensors, biases and the model's
``no_weight_decay()`` names only (beit2 decays the relative-position tables unless
``--disable_weight_decay_on_rel_pos_bias``).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

# BEiT get_num_layer_for_vit's layer 0, in timm's names (FT-CLIP: class_embedding -> cls_token,
# positional_embedding -> pos_embed, conv1 -> patch_embed, ln_pre -> norm_pre)
STEM = ("cls_token", "pos_embed", "mask_token", "reg_token", "dist_token")
STEM_PREFIXES = ("patch_embed.", "norm_pre.")


def beit_layer_id(name: str, num_blocks: int) -> int:
    """The layer of a parameter by BEiT's rule (0 .. num_blocks + 1)."""
    from ..branches.mask_token import TOKEN_NAME

    if name in STEM or name == TOKEN_NAME or name.startswith(STEM_PREFIXES):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return num_blocks + 1  # rel_pos_bias, norm, fc_norm, head: the top layer


def no_decay_names(model: nn.Module, names: list[str] | None) -> set[str]:
    """The names kept out of weight decay: the config's list, else the model's own."""
    if names is not None:
        return set(names)
    own = getattr(model, "no_weight_decay", None)
    return set(own()) if callable(own) else set()


def beit_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None,
                      no_weight_decay: list[str] | None = None) -> list[dict[str, Any]]:
    """BEiT ``get_parameter_groups`` with ``LayerDecayValueAssigner``: scale ``layer_decay **
    (num_blocks + 1 - layer_id)``; no decay for ``ndim <= 1``, ``.bias`` and the skip list."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        from ..errors import MaskSubError

        raise MaskSubError(f"layer_decay_rule: beit needs a model with numbered blocks (model.blocks); "
                           f"{type(model).__name__} has none. Use layer_decay_rule: timm")
    n = len(blocks)
    skip = no_decay_names(model, no_weight_decay)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = beit_layer_id(name, n) if layer_decay is not None else n + 1
        g = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": 1.0 if layer_decay is None else layer_decay ** (n + 1 - layer)})
        g["params"].append(p)
    return list(groups.values())


def per_parameter(optimizer: Any, model: nn.Module) -> dict[str, tuple[float, float]]:
    """name -> (lr scale, weight decay) as an optimizer holds them (what the tests compare)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            out[names[id(p)]] = (g.get("lr_scale", 1.0), g["weight_decay"])
    return out


def peak_lr(optimizer: Any) -> float:
    """The lr to log: the largest over the groups (MAE ``engine_finetune.py`` logs the max), not
    group 0's, which under layer decay is the lowest layer's."""
    return max(g["lr"] for g in optimizer.param_groups)
