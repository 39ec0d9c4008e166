"""The paper's recipes equal their published sources, in the YAML and in the built objects.

``PUBLISHED`` is the reference: each value with the file it was read from (the MaskSub authors'
public code, naver-ai/augsub, first; then the original projects). A recipe that drifts from it
fails here; so does a built model, transform, criterion, sampler, optimizer or schedule that
does not do what the value says.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from masksub.train import config as C
from masksub.train.data import build_transforms
from masksub.train.engine import Trainer

RECIPES = C.recipe_names()
AUGSUB = "naver-ai/augsub"

# -- the published values ----------------------------------------------------------------------
DEIT_SRC = f"{AUGSUB} deit/README.md"
DEIT_MAIN = f"{AUGSUB} deit/main.py (argparse defaults)"
DEIT_COMMON = {  # every DeiT-III stage-1 command
    "aug": ("3aug", f"{DEIT_SRC} --ThreeAugment; deit/augment.py RandomResizedCrop"),
    "color_jitter": (0.3, f"{DEIT_SRC} --color-jitter 0.3"),
    "reprob": (0.0, f"{DEIT_SRC} --reprob 0.0"),
    "crop_pct": (1.0, f"{DEIT_SRC} --eval-crop-ratio 1.0"),
    "mixup": (0.8, DEIT_MAIN), "cutmix": (1.0, DEIT_MAIN),
    "label_smoothing": (0.0, f"{DEIT_SRC} --smoothing 0.0"),
    "bce": (True, f"{DEIT_SRC} --bce-loss"),
    "bce_target_thresh": (0.0, f"{AUGSUB} deit/engine.py targets.gt(0.0)"),
    "repeated_aug": (3, f"{DEIT_SRC} --repeated-aug; deit/samplers.py"),
    "opt": ("lamb", f"{DEIT_SRC} --opt fusedlamb"),
    "opt_eps": (1e-8, DEIT_MAIN),
    "batch_total": (2048, DEIT_SRC), "lr_scale": ("none", f"{DEIT_SRC} --unscale-lr"),
    "sched": ("cosine", DEIT_MAIN), "sched_step": ("epoch", f"{AUGSUB} deit/main.py lr_scheduler.step(epoch)"),
    "sched_epoch_lag": (1, f"{AUGSUB} deit/main.py: step(epoch) after epoch e"),
    "warmup_epochs": (5, DEIT_MAIN), "warmup_lr": (1e-6, DEIT_MAIN), "min_lr": (1e-5, DEIT_MAIN),
    "drop_path_uniform": (True, f"{AUGSUB} deit/models_v2.py dpr = [drop_path_rate ...]"),
    "model_kwargs": ({"init_values": 1e-4}, f"{AUGSUB} deit/models_v2.py init_values=1e-4"),
    "sub": ("mask", f"{DEIT_SRC} --augsub masking"), "ratio": (0.5, f"{DEIT_SRC} --augsub-ratio 0.5"),
    "re_mode": ("pixel", f"{DEIT_MAIN} --remode"), "re_count": (1, f"{DEIT_MAIN} --recount"),
    "cls_token_init_std": (0.02, f"{AUGSUB} deit/models_v2.py trunc_normal_(self.cls_token, std=.02)"),
}
DEIT_ROWS = {  # size: model, img, lr, per-GPU batch, drop-path 400 / 800
    "s": ("deit3_small_patch16_224", 224, 4e-3, 256, 0.0, 0.05),
    "b": ("deit3_base_patch16_224", 192, 3e-3, 256, 0.1, 0.2),
    "l": ("deit3_large_patch16_224", 192, 3e-3, 32, 0.4, 0.45),
    "h": ("deit3_huge_patch14_224", 160, 3e-3, 32, 0.5, 0.6),
}
DEIT_FT = {  # the 224 fine-tune: per-GPU batch, drop-path
    "b": (64, 0.2), "l": (8, 0.45), "h": (8, 0.55),
}
PUBLISHED: dict[str, dict[str, tuple]] = {}
for s, (model, img, lr, bs, dp400, dp800) in DEIT_ROWS.items():
    for ep, dp, wd in ((400, dp400, 0.03), (800, dp800, 0.05)):
        PUBLISHED[f"deit3-vit-{s}-{ep}"] = DEIT_COMMON | {
            "model": (model, f"{DEIT_SRC} --model deit_*_LS; timm deit3_* = the same architecture"),
            "img_size": (img, f"{DEIT_SRC} --input-size"), "lr": (lr, f"{DEIT_SRC} --lr"),
            "batch_size": (bs, f"{DEIT_SRC} --batch-size"), "drop_path": (dp, f"{DEIT_SRC} --drop-path"),
            "weight_decay": (wd, f"{DEIT_SRC} --weight-decay"), "epochs": (ep, f"{DEIT_SRC} --epochs"),
        }
for s, (bs, dp) in DEIT_FT.items():
    ft = f"{DEIT_SRC} (Finetune)"
    PUBLISHED[f"deit3-vit-{s}-ft224"] = {
        "model": (DEIT_ROWS[s][0], ft), "img_size": (224, ft), "batch_size": (bs, ft), "batch_total": (512, ft),
        "drop_path": (dp, ft), "drop_path_uniform": (True, f"{AUGSUB} deit/models_v2.py"),
        "epochs": (20, ft), "opt": ("adamw", ft), "opt_eps": (1e-8, DEIT_MAIN), "lr": (1e-5, ft),
        "lr_scale": ("none", f"{ft} --unscale-lr"), "weight_decay": (0.1, ft), "label_smoothing": (0.1, ft),
        "mixup": (0.8, ft), "cutmix": (1.0, ft), "auto_augment": ("rand-m9-mstd0.5-inc1", ft), "aug": ("timm", ft),
        "reprob": (0.0, ft), "repeated_aug": (0, f"{ft} --no-repeated-aug"), "bce": (False, ft),
        "crop_pct": (1.0, ft), "sched_step": ("epoch", DEIT_MAIN), "sched_epoch_lag": (1, DEIT_MAIN),
        "warmup_epochs": (5, DEIT_MAIN),
        "warmup_lr": (1e-6, DEIT_MAIN), "min_lr": (1e-5, DEIT_MAIN), "sub": ("mask", ft), "ratio": (0.5, ft),
        "re_mode": ("pixel", f"{DEIT_MAIN} --remode"), "re_count": (1, f"{DEIT_MAIN} --recount"),
        "pos_embed_resample": ("bicubic", f"{AUGSUB} deit/main.py F.interpolate(mode='bicubic', align_corners=False)"),
    }
MAE = f"{AUGSUB} mae/README.md"
MAE_MAIN = f"{AUGSUB} mae/main_finetune.py"
for s, model, ep, lr, ld, dp, bs, acc in (("b", "vit_base_patch16_224", 100, 2e-3, 0.65, 0.1, 128, 1),
                                          ("l", "vit_large_patch16_224", 50, 4e-3, 0.75, 0.2, 32, 4),
                                          ("h", "vit_huge_patch14_224", 50, 4e-3, 0.75, 0.3, 16, 1)):
    PUBLISHED[f"mae-ft-vit-{s}"] = {
        "model": (model, f"{AUGSUB} mae/models_vit.py"), "epochs": (ep, MAE),
        "lr": (lr, f"{MAE} --blr x 1024 / 256 ({MAE_MAIN})"), "batch_total": (1024, MAE),
        "batch_size": (bs, MAE), "accum_steps": (acc, f"{MAE} --accum_iter"),
        "lr_scale": ("linear_lr", f"{MAE_MAIN} lr = blr * eff_batch_size / 256 (min_lr as given)"),
        "re_mode": ("pixel", f"{MAE_MAIN} --remode; mae/util/datasets.py"), "re_count": (1, f"{MAE_MAIN} --recount"),
        "layer_decay_rule": ("beit", f"{AUGSUB} mae/util/lr_decay.py get_layer_id_for_vit"),
        "no_weight_decay": (["pos_embed", "cls_token", "dist_token"], f"{MAE_MAIN} model.no_weight_decay()"),
        "layer_decay": (ld, MAE), "drop_path": (dp, MAE), "weight_decay": (0.05, MAE), "opt": ("adamw", MAE_MAIN),
        "opt_betas": ([0.9, 0.999], MAE_MAIN), "warmup_epochs": (5, MAE_MAIN), "min_lr": (1e-6, MAE_MAIN),
        "warmup_lr": (0.0, f"{AUGSUB} mae/util/lr_sched.py"), "warmup_prefix": (True, f"{AUGSUB} mae/util/lr_sched.py"),
        "sched_step": ("update", f"{AUGSUB} mae/util/lr_sched.py"), "label_smoothing": (0.1, MAE_MAIN),
        "mixup": (0.8, MAE), "cutmix": (1.0, MAE), "reprob": (0.25, MAE),
        "auto_augment": ("rand-m9-mstd0.5-inc1", MAE_MAIN), "head_init_std": (2e-5, MAE_MAIN),
        "model_kwargs": ({"global_pool": "avg", "fc_norm": True}, MAE_MAIN), "ema": (False, MAE),
    }
BEIT = "microsoft/unilm beit2/get_started_for_image_classification.md"
BEIT_MAIN = "microsoft/unilm beit2/run_class_finetuning.py"
for s, model, ep, lr, ld, bs, acc, wu in (("b", "beitv2_base_patch16_224", 100, 5e-4, 0.6, 128, 1, 20),
                                          ("l", "beitv2_large_patch16_224", 50, 2e-4, 0.8, 64, 2, 5)):
    PUBLISHED[f"beitv2-ft-vit-{s}"] = {
        "model": (model, BEIT), "epochs": (ep, BEIT), "lr": (lr, BEIT), "layer_decay": (ld, BEIT),
        "drop_path": (0.2, BEIT), "batch_size": (bs, BEIT), "accum_steps": (acc, BEIT), "batch_total": (1024, BEIT),
        "lr_scale": ("none", BEIT_MAIN), "warmup_epochs": (wu, BEIT), "weight_decay": (0.05, BEIT),
        "mixup": (0.8, BEIT), "cutmix": (1.0, BEIT), "label_smoothing": (0.1, BEIT_MAIN), "reprob": (0.25, BEIT_MAIN),
        "opt_eps": (1e-8, BEIT_MAIN), "min_lr": (1e-6, BEIT_MAIN), "head_init_scale": (0.001, BEIT_MAIN),
        "crop_pct": (0.875, "microsoft/unilm beit2/datasets.py"),
        "mean": ([0.485, 0.456, 0.406], f"{BEIT} --imagenet_default_mean_and_std"),
        "warmup_lr": (0.0, "beit2/utils.py cosine_scheduler start_warmup_value=0"), "warmup_prefix": (True, BEIT_MAIN),
        "family": ("beit", "MaskSub paper: BEiT's own mask token"), "family_options": ({"block": True}, BEIT),
        "re_mode": ("pixel", f"{BEIT_MAIN} --remode"), "re_count": (1, f"{BEIT_MAIN} --recount"),
        "layer_decay_rule": ("beit", "microsoft/unilm beit2/optim_factory.py get_num_layer_for_vit"),
        "no_weight_decay": (["pos_embed", "cls_token"], f"{BEIT_MAIN} skip list (no --disable_weight_decay_on_rel_pos_bias)"),
    }
FTC = "LightDXY/FT-CLIP"
for name, model, script, ep, lr, wu, ld, bs, acc in (
        ("ftclip-vit-b", "vit_base_patch16_clip_quickgelu_224", "scripts/bash_fine_Openai_CLIP_P16.sh", 50, 6e-4, 10, 0.6, 256, 1),
        ("ftclip-vit-l14", "vit_large_patch14_clip_quickgelu_224", "scripts/bash_fine_Openai_CLIP_Large_P14.sh", 30, 4e-4, 5, 0.65, 64, 4)):
    src, ftm = f"{FTC} {script}", f"{FTC} run_class_finetuning.py"
    PUBLISHED[name] = {
        "model": (model, f"{FTC} models/finetune_clip.py QuickGELU"), "epochs": (ep, src), "lr": (lr, src),
        "warmup_epochs": (wu, src), "layer_decay": (ld, src), "batch_size": (bs, src), "accum_steps": (acc, src),
        "batch_total": (2048, src), "lr_scale": ("none", ftm), "drop_path": (0.0, src), "weight_decay": (0.05, src),
        "mixup": (0.0, src), "cutmix": (0.0, src), "label_smoothing": (0.1, ftm), "reprob": (0.25, ftm),
        "ema": (True, src), "ema_decay": (0.9998, src), "crop_pct": (1.0, f"{FTC} datasets.py"),
        "mean": ([0.48145466, 0.4578275, 0.40821073], f"{FTC} datasets.py"), "min_lr": (1e-6, ftm),
        "warmup_lr": (0.0, f"{FTC} utils.py cosine_scheduler"), "warmup_prefix": (True, f"{FTC} utils.py"),
        "head_init_scale": (0.001, f"{FTC} models/finetune_clip.py"), "freeze": (["patch_embed."], f"{FTC} models/finetune_clip.py freeze_conv1"),
        "pretrained_exclude": (["norm."], f"{FTC} models/finetune_clip.py (no ln_post)"),
        "re_mode": ("pixel", f"{ftm} --remode; {FTC} datasets.py"), "re_count": (1, f"{ftm} --recount"),
        "layer_decay_rule": ("beit", f"{FTC} optim_factory.py get_num_layer_for_vit"),
        "no_weight_decay": (["pos_embed", "cls_token"], f"{FTC} models/finetune_clip.py no_weight_decay()"),
        "model_kwargs": ({"global_pool": "avg", "fc_norm": False}, f"{FTC} models/finetune_clip.py fc_norm(x[:,1:]).mean(1)"),
    }
RSB = f"{AUGSUB} resnet_rsb/README.md"
RSB_MAIN = f"{AUGSUB} resnet_rsb/train.py (timm 0.5.4 defaults)"
for m in ("resnet50", "resnet101", "resnet152"):
    PUBLISHED[f"rsb-a2-{m}"] = {
        "model": (m, RSB), "epochs": (300, RSB), "batch_size": (256, RSB), "batch_total": (2048, RSB),
        "opt": ("lamb", RSB), "opt_eps": (None, RSB_MAIN), "lr": (5e-3, RSB), "weight_decay": (0.02, RSB),
        "warmup_epochs": (5, RSB), "warmup_lr": (1e-4, RSB_MAIN), "min_lr": (1e-6, RSB_MAIN),
        "sched_step": ("epoch", RSB_MAIN), "sched_epoch_lag": (0, f"{RSB_MAIN} step(epoch + 1)"), "drop_path": (0.05, RSB), "label_smoothing": (0.0, RSB),
        "mixup": (0.1, RSB), "cutmix": (1.0, RSB), "auto_augment": ("rand-m7-mstd0.5", RSB),
        "repeated_aug": (3, f"{RSB} --aug-repeats 3"), "reprob": (0.0, RSB), "color_jitter": (0.0, RSB),
        "crop_pct": (0.95, RSB), "bce": (True, RSB), "bce_target_thresh": (None, RSB_MAIN),
        "train_interpolation": ("random", RSB_MAIN), "img_size": (224, RSB), "ema": (False, RSB),
        "lr_scale": ("none", RSB_MAIN), "re_mode": ("pixel", f"{RSB_MAIN} --remode"), "re_count": (1, RSB_MAIN),
    }
SWIN = f"{AUGSUB} swin/config.py"
for s, m, dp in (("t", "swin_tiny_patch4_window7_224", 0.2), ("s", "swin_small_patch4_window7_224", 0.3),
                 ("b", "swin_base_patch4_window7_224", 0.5)):
    y = f"{AUGSUB} swin/configs/swin/{m}.yaml"
    PUBLISHED[f"swin-{s}"] = {
        "model": (m, y), "drop_path": (dp, y), "epochs": (300, SWIN), "batch_size": (128, f"{AUGSUB} swin/README.md"),
        "batch_total": (1024, f"{AUGSUB} swin/README.md"), "lr": (1e-3, f"{SWIN} BASE_LR 5e-4 x 1024/512 (swin/main.py)"),
        "warmup_lr": (1e-6, SWIN), "min_lr": (1e-5, SWIN), "lr_scale": ("linear", f"{AUGSUB} swin/main.py"),
        "opt": ("adamw", SWIN), "opt_eps": (1e-8, SWIN), "opt_betas": ([0.9, 0.999], SWIN), "weight_decay": (0.05, SWIN),
        "warmup_epochs": (20, SWIN), "warmup_prefix": (False, SWIN), "sched_step": ("update", f"{AUGSUB} swin/lr_scheduler.py"),
        "clip_grad": (5.0, SWIN), "label_smoothing": (0.1, SWIN), "mixup": (0.8, SWIN), "cutmix": (1.0, SWIN),
        "reprob": (0.25, SWIN), "auto_augment": ("rand-m9-mstd0.5-inc1", SWIN),
        "re_mode": ("pixel", f"{SWIN} _C.AUG.REMODE; swin/data/build.py"), "re_count": (1, f"{SWIN} _C.AUG.RECOUNT"),
    }
PAPER = sorted(PUBLISHED)

# Per parameter, the layer-decay recipes: (layer, weight decay on?) by the source's rule, for a
# two-block model; layer "top" = scale 1.0, layer l = layer_decay ** (3 - l); None: not checked.
LD_PARAMS: dict[str, tuple[dict[str, tuple], str]] = {
    "mae-ft": ({"cls_token": (0, False), "pos_embed": (0, False), "patch_embed.proj.weight": (0, True),
                "blocks.0.attn.qkv.weight": (1, True), "blocks.0.attn.qkv.bias": (1, False),
                "blocks.1.norm1.weight": (2, False), "fc_norm.weight": ("top", False),
                "head.weight": ("top", True), "head.bias": ("top", False)},
               f"{AUGSUB} mae/util/lr_decay.py param_groups_lrd + get_layer_id_for_vit"),
    "beitv2": ({"cls_token": (0, False), "masksub_mask_token": (0, None), "patch_embed.proj.weight": (0, True),
                "blocks.0.attn.relative_position_bias_table": (1, True),
                "blocks.1.attn.relative_position_bias_table": (2, True), "blocks.0.gamma_1": (1, False),
                "blocks.1.attn.qkv.weight": (2, True), "fc_norm.weight": ("top", False),
                "head.weight": ("top", True)},
               "microsoft/unilm beit2/optim_factory.py get_parameter_groups + get_num_layer_for_vit; "
               "run_class_finetuning.py skip list"),
    "ftclip": ({"cls_token": (0, False), "pos_embed": (0, False), "norm_pre.weight": (0, False),
                "blocks.0.attn.qkv.weight": (1, True), "blocks.1.mlp.fc1.weight": (2, True),
                "blocks.1.mlp.fc1.bias": (2, False), "norm.weight": ("top", False), "norm.bias": ("top", False),
                "head.weight": ("top", True)},
               f"{FTC} optim_factory.py get_parameter_groups + get_num_layer_for_vit (fc_norm, head: the top)"),
}
# Initial values: (parameter, std, source)
INIT_STD: dict[str, tuple[str, float, str]] = {
    "mae-ft": ("head.weight", 2e-5, f"{AUGSUB} mae/main_finetune.py trunc_normal_(head.weight, std=2e-5)"),
    "beitv2": ("head.weight", 2e-5, "microsoft/unilm beit2/modeling_finetune.py trunc_normal_(std=.02) x init_scale 0.001"),
    "ftclip": ("head.weight", 2e-5, f"{FTC} models/finetune_clip.py trunc_normal_(std=.02) x 0.001"),
    "deit3-vit-s-400": ("cls_token", 0.02, f"{AUGSUB} deit/models_v2.py trunc_normal_(self.cls_token, std=.02)"),
    "deit3-vit-b-800": ("cls_token", 0.02, f"{AUGSUB} deit/models_v2.py trunc_normal_(self.cls_token, std=.02)"),
}
# -----------------------------------------------------------------------------------------------

# A tiny version of each family: same model class, same code paths, a fraction of the size.
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
TINY = {
    "vit": {"model_kwargs": TINY_VIT},
    "swin": {"model_kwargs": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}},
    "resnet": {"model_kwargs": {"layers": [1, 1, 1, 1]}, "img_size": 64},
}


def tiny(name: str) -> dict:
    if name.startswith("fmnist-cpu-"):  # already tiny: their own model, on synthetic images
        return dict(data="synthetic", synthetic_size=4, synthetic_val_size=2, batch_size=2, progress=False,
                    tensorboard=False, workers=0)
    model = yaml.safe_load(C.find_recipe(name).read_text())["model"]
    fam = "swin" if model.startswith("swin") else "resnet" if model.startswith("resnet") else "vit"
    over = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY[fam].items()}
    over.update(data="synthetic", synthetic_size=4, synthetic_val_size=2, batch_size=2, accum_steps=1,
                progress=False, tensorboard=False, workers=0)
    if name.startswith("deit3-vit-h") or name.startswith("mae-ft-vit-h"):
        over["img_size"] = 56  # patch 14
    elif fam == "vit":
        over["img_size"] = 64
    return over


def test_paper_rows_are_all_there() -> None:
    want = {f"deit3-vit-{s}-{e}" for s in "sblh" for e in (400, 800)} | {f"deit3-vit-{s}-ft224" for s in "blh"}
    want |= {"mae-ft-vit-b", "mae-ft-vit-l", "mae-ft-vit-h", "beitv2-ft-vit-b", "beitv2-ft-vit-l",
             "ftclip-vit-b", "ftclip-vit-l14", "rsb-a2-resnet50", "rsb-a2-resnet101", "rsb-a2-resnet152",
             "swin-t", "swin-s", "swin-b", "fashion-mnist", "fashion-mnist-quick"}
    assert want <= set(RECIPES)
    assert set(PAPER) == want - {"fashion-mnist", "fashion-mnist-quick"}
    for name in RECIPES:
        cfg = yaml.safe_load(C.find_recipe(name).read_text())
        assert cfg.get("source"), f"{name} has no source line"


def _uncommented(name: str) -> list[str]:
    """The recipe's value lines (top-level keys) with no comment naming where the value comes from."""
    lines = {ln.split(":", 1)[0].strip(): ln for ln in C.find_recipe(name).read_text().splitlines()
             if ln and not ln.startswith((" ", "#"))}
    return [k for k, ln in lines.items() if k != "source" and "   # " not in ln]


@pytest.mark.parametrize("name", sorted(n for n in RECIPES if n.startswith("fmnist-cpu-")))
def test_evidence_recipes_name_a_source_on_every_line(name: str) -> None:
    """The project's own recipes too: each value says where it comes from (the reference recipe,
    the paper, or the CPU budget the header explains)."""
    assert not _uncommented(name), f"{name}: values without a comment naming their source: {_uncommented(name)}"


@pytest.mark.parametrize("name", PAPER)
def test_recipe_equals_published(name: str) -> None:
    """Each published value, and a comment naming where it comes from on the recipe's line."""
    cfg = C.load(name, {"data": "synthetic"})  # the ImageNet path need not exist here
    wrong = {k: (getattr(cfg, k), v, src) for k, (v, src) in PUBLISHED[name].items()
             if (getattr(cfg, k) != v if not isinstance(v, float) else abs(getattr(cfg, k) - v) > 1e-12 * max(1, abs(v)))}
    assert not wrong, f"{name}: (recipe, published, source) = {wrong}"
    uncommented = _uncommented(name)
    assert not uncommented, f"{name}: values without a comment naming their source: {uncommented}"
    assert "from memory" not in C.find_recipe(name).read_text()


def test_fashion_mnist_recipe_is_design_md() -> None:
    cfg = C.load("fashion-mnist")
    assert (cfg.img_size, cfg.in_chans, cfg.drop_path, cfg.opt, cfg.lr, cfg.weight_decay) == (
        28, 1, 0.1, "adamw", 2e-3, 0.05)
    assert cfg.model_kwargs == {"patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3}
    assert (cfg.batch_size, cfg.epochs, cfg.warmup_epochs, cfg.clip_grad, cfg.amp) == (512, 30, 2, 1.0, "bf16")
    assert (cfg.crop_pad, cfg.hflip, cfg.sched, cfg.sub, cfg.ratio) == (2, 0.5, "cosine", "mask", 0.5)


def _first_crop(tf) -> object:
    return tf.transforms[0]


def check_built(name: str, cfg: C.Config, t: Trainer, train_tf) -> None:
    """What only the built objects show, against the published value (the recipe's for the
    non-paper recipes): architecture, drop-path per block, crop, criterion, sampler repeats,
    optimizer eps, schedule stepping, head init, frozen parameters."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from timm.layers import DropPath, LayerScale

    model = t.model_raw
    pub = PUBLISHED.get(name, {})

    def want(key: str):
        return pub[key][0] if key in pub else getattr(cfg, key)

    if name.startswith("deit3"):
        assert model.no_embed_class, "DeiT-III: position embedding on patch tokens only"
        for b in model.blocks:
            assert isinstance(b.ls1, LayerScale) and isinstance(b.ls2, LayerScale)
            assert torch.allclose(b.ls1.gamma, torch.full_like(b.ls1.gamma, 1e-4))
        rates = [m.drop_prob if isinstance(m, DropPath) else 0.0
                 for b in model.blocks for m in (b.drop_path1, b.drop_path2)]
        assert rates == [pytest.approx(want("drop_path"))] * len(rates), f"drop-path per block {rates}"
    crop = train_tf.transforms[0]
    if want("aug") in ("3aug", "timm"):
        assert isinstance(crop, RandomResizedCropAndInterpolation) and crop.scale == (0.08, 1.0), crop
        random_interp = isinstance(crop.interpolation, (list, tuple))
        assert random_interp == (want("train_interpolation") == "random"), crop.interpolation
    # criterion: what it does to soft (mixed) targets on the main branch
    logits = torch.randn(4, 5)
    target = torch.softmax(torch.randn_like(logits), -1) * 0.5
    if want("bce"):
        from torch.nn.functional import binary_cross_entropy_with_logits as bce

        got = t.criterion(logits, target)
        if want("bce_target_thresh") == 0.0:  # DeiT-III engine.py: targets.gt(0.0)
            assert torch.allclose(got, bce(logits, target.gt(0.0).float())), "main-branch targets not binarised"
        else:  # RSB: soft targets
            assert torch.allclose(got, bce(logits, target)), "soft targets were changed"
    assert t.train_data.repeats == want("repeated_aug")
    eps = {g.get("eps") for g in t.optimizer.param_groups}
    if "opt_eps" in pub:
        assert eps == {want("opt_eps") if want("opt_eps") is not None else 1e-6}, f"optimizer eps {eps}"  # timm Lamb: 1e-6
    assert t.scheduler.t_in_epochs == (want("sched_step") == "epoch")
    head = model.get_classifier()
    if want("head_init_std") is not None:
        assert head.weight.std() < 2 * want("head_init_std") and not head.bias.any()
    if want("head_init_scale") is not None:
        assert head.weight.abs().max() < 0.1 * want("head_init_scale")
    for prefix in want("freeze") or []:
        frozen = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        assert frozen and not any(p.requires_grad for p in frozen), f"{prefix} not frozen"
    if name.startswith("ftclip"):
        from timm.layers import QuickGELU

        assert isinstance(model.blocks[0].mlp.act, QuickGELU)
        # FT-CLIP: a norm on every patch token, then their mean (models/finetune_clip.py)
        assert isinstance(model.norm, torch.nn.LayerNorm) and isinstance(model.fc_norm, torch.nn.Identity)
        assert model.global_pool == "avg"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_and_steps(name: str, tmp_path: Path) -> None:
    cfg = C.load(name, tiny(name) | {"output": str(tmp_path)})
    # the real (ImageNet-style) input pipeline of the recipe, on one image
    train_tf, eval_tf = build_transforms(cfg)
    img = Image.new("L" if cfg.in_chans == 1 else "RGB", (cfg.img_size + 16, cfg.img_size + 8))
    for tf in (train_tf, eval_tf):
        assert tuple(tf(img).shape) == (cfg.in_chans, cfg.img_size, cfg.img_size)
    t = Trainer(cfg)
    assert t.ms.branch is not None
    check_built(name, cfg, t, train_tf)
    upe = t.updates_per_epoch
    if cfg.sched_step == "epoch":  # the lr moves at epoch starts only
        t.scheduler.step(cfg.epochs // 2)
        lr = t.optimizer.param_groups[0]["lr"]
        t.scheduler.step_update(cfg.epochs // 2 * upe + 1)
        assert t.optimizer.param_groups[0]["lr"] == lr
        lrs = set()
        for ep in (0, 1, cfg.epochs // 2, cfg.epochs - 1):
            t.scheduler.step(ep)
            lrs.add(round(t.optimizer.param_groups[0]["lr"], 12))
        assert len(lrs) > 2
        t.scheduler.step(cfg.epochs // 2)
    else:
        lrs = set()
        total = cfg.epochs * upe
        for step in sorted({int(total * f) for f in (0, 0.001, 0.01, 0.3, 0.6, 0.9)}):  # warm-up, cosine
            t.scheduler.step_update(step)
            lrs.add(round(t.optimizer.param_groups[0]["lr"], 12))
        assert len(lrs) > 2
        t.global_step = total // 2  # a step with lr > 0 (the warm-up of some recipes starts at 0)
    if cfg.layer_decay:
        scales = {g.get("lr_scale", 1.0) for g in t.optimizer.param_groups}
        assert len(scales) > 1, "layer-wise lr decay made no groups"
    if name.startswith("beit"):
        assert t.ms.branch.name == "beit" and t.ms.branch.block
        assert hasattr(t.model_raw, "masksub_mask_token")
    if name.startswith("swin"):
        assert t.ms.branch.name == "swin"
    before = [p.detach().clone() for p in t.model_raw.parameters()]
    t._it = t.train_data.iterate(0, 0)
    stats = t._update()
    assert stats is not None and torch.isfinite(stats.loss_main) and torch.isfinite(stats.loss_sub)
    changed = sum(not torch.equal(a, p) for a, p in zip(before, t.model_raw.parameters(), strict=True))
    assert changed > 0
    t.log.close()


def test_lr_per_epoch_as_deit_steps_it(tmp_path: Path) -> None:
    """DeiT-III: the lr is constant within an epoch, and epoch e trains at lr(e - 1) (main.py calls
    ``lr_scheduler.step(epoch)`` after epoch e), with timm's cosine + warm-up values."""
    import json

    from timm.scheduler import CosineLRScheduler

    from masksub.cli import main

    assert main(["train", "--recipe", "deit3-vit-s-400", "--data", "synthetic", "--set", "synthetic_size=8",
                 "--set", "synthetic_val_size=2", "--batch-size", "4", "--epochs", "4", "--set", "warmup_epochs=2",
                 "--set", "img_size=32", "--set", "model_kwargs.depth=1", "--set", "model_kwargs.embed_dim=32",
                 "--set", "model_kwargs.num_heads=2", "--set", "repeated_aug=0", "--set", "log_every=1",
                 "--amp", "none", "--no-progress", "--set", "tensorboard=false", "--output", str(tmp_path),
                 "--run-name", "lr"]) == 0
    steps = [json.loads(s) for s in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    per_epoch: dict[int, set] = {}
    for r in steps:
        if r["kind"] == "step":
            per_epoch.setdefault(r["epoch"], set()).add(r["lr"])
    assert all(len(v) == 1 for v in per_epoch.values()) and len(per_epoch) == 4
    sched = CosineLRScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=4e-3), t_initial=4,
                              lr_min=1e-5, warmup_t=2, warmup_lr_init=1e-6)
    want = [sched._get_lr(max(e - 1, 0))[0] for e in range(4)]
    assert [per_epoch[e].pop() for e in range(4)] == pytest.approx(want)
    assert want[0] == want[1] != want[2]


# -- how each value is applied: built objects against the sources ------------------------------
def _built(name: str, tmp_path: Path) -> Trainer:
    return Trainer(C.load(name, tiny(name) | {"output": str(tmp_path)}))


def _family(name: str, table: dict) -> str | None:
    return next((k for k in table if name.startswith(k)), None)


@pytest.mark.parametrize("name", [n for n in PAPER if _family(n, LD_PARAMS)])
def test_layer_decay_per_parameter_as_the_source(name: str, tmp_path: Path) -> None:
    """Every listed parameter's lr scale and weight decay in the built optimizer = the source's
    rule (FT-CLIP's fc_norm at 1.0, BEiT v2's relative-position tables decayed, its mask token at
    layer 0)."""
    t = _built(name, tmp_path)
    cfg = t.cfg
    names = {id(p): n for n, p in t.model_raw.named_parameters()}
    got = {names[id(p)]: (g.get("lr_scale", 1.0), g["weight_decay"]) for g in t.optimizer.param_groups for p in g["params"]}
    want, src = LD_PARAMS[_family(name, LD_PARAMS)]
    depth = len(t.model_raw.blocks)
    assert depth == 2
    wrong = {}
    for pname, (layer, decay) in want.items():
        scale = 1.0 if layer == "top" else cfg.layer_decay ** (depth + 1 - layer)
        lr_scale, wd = got[pname]
        if abs(lr_scale - scale) > 1e-9 or (decay is not None and wd != (cfg.weight_decay if decay else 0.0)):
            wrong[pname] = {"got": (lr_scale, wd), "want": (scale, cfg.weight_decay if decay else 0.0)}
    assert not wrong, f"{name} vs {src}: {wrong}"
    t.log.close()


@pytest.mark.parametrize("name", [n for n in PAPER if _family(n, INIT_STD)])
def test_initial_values_as_the_source(name: str, tmp_path: Path) -> None:
    """The classifier's start (MAE / BEiT v2 / FT-CLIP: std 2e-5) and DeiT-III's cls_token (.02)."""
    pname, std, src = INIT_STD[_family(name, INIT_STD)]
    cfg = C.load(name, tiny(name) | {"output": str(tmp_path)})
    if pname == "cls_token":
        cfg.model_kwargs["embed_dim"] = 384  # enough values for a std
    from masksub.train.build import build_model

    torch.manual_seed(0)
    p = dict(build_model(cfg).named_parameters())[pname]
    assert 0.75 * std < p.detach().float().std().item() < 1.25 * std, f"{name} {pname} std vs {src}"


@pytest.mark.parametrize("name", [n for n in PAPER if PUBLISHED[n].get("reprob", (0,))[0] > 0])
def test_random_erasing_is_the_sources_per_pixel_noise(name: str) -> None:
    from timm.data.random_erasing import RandomErasing

    cfg = C.load(name, tiny(name))
    train_tf, _ = build_transforms(cfg)
    er = [t for t in train_tf.transforms if isinstance(t, RandomErasing)]
    assert len(er) == 1 and er[0].probability == pytest.approx(cfg.reprob)
    assert er[0].mode == PUBLISHED[name]["re_mode"][0] == "pixel" and er[0].per_pixel
    assert er[0].max_count == PUBLISHED[name]["re_count"][0]


def test_mae_scales_lr_but_not_min_lr_and_swin_scales_both() -> None:
    """MAE main_finetune.py: lr = blr x batch / 256, --min_lr as given; Swin main.py scales all."""
    from masksub.train.build import effective_lr

    mae = C.load("mae-ft-vit-b", {"data": "synthetic"})  # batch 128 on one process: 1/8 of 1024
    lr, wlr, mlr, _ = effective_lr(mae, world=1)
    assert lr == pytest.approx(2e-3 / 8) and mlr == pytest.approx(1e-6) and wlr == 0.0
    swin = C.load("swin-t", {"data": "synthetic"})
    lr, wlr, mlr, _ = effective_lr(swin, world=1)
    assert lr == pytest.approx(1e-3 / 8) and mlr == pytest.approx(1e-5 / 8) and wlr == pytest.approx(1e-6 / 8)


def test_deit_224_stage_resamples_pos_embed_as_deit_main(tmp_path: Path) -> None:
    """deit main.py --finetune: plain F.interpolate bicubic, align_corners=False (timm's filter
    antialiases: ~1% off on a smooth field)."""
    import torch.nn.functional as F

    from masksub.train.build import build_model

    over = tiny("deit3-vit-b-ft224")
    stage1 = C.load("deit3-vit-b-ft224", over | {"img_size": 96})  # grid 6 -> 4 at img 64
    src_model = build_model(stage1)
    grid = torch.linspace(0, 1, 6)
    smooth = (torch.sin(3 * grid)[:, None] * torch.cos(2 * grid)[None, :]).reshape(1, 36, 1)
    with torch.no_grad():
        src_model.pos_embed.copy_(smooth.expand_as(src_model.pos_embed) * torch.linspace(0.5, 1.5, 32))
    path = tmp_path / "stage1.pt"
    torch.save({"model": src_model.state_dict()}, path)
    cfg = C.load("deit3-vit-b-ft224", over | {"pretrained_file": str(path)})
    model = build_model(cfg)
    pe = src_model.pos_embed.detach().reshape(1, 6, 6, 32).permute(0, 3, 1, 2)
    want = F.interpolate(pe, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 32)
    assert torch.allclose(model.pos_embed.detach(), want, atol=1e-6)


def test_logged_lr_is_the_peak_over_groups(tmp_path: Path) -> None:
    """With layer decay group 0 is the lowest layer: the log shows the max, as MAE's engine."""
    t = _built("mae-ft-vit-b", tmp_path)
    t.scheduler.step_update(t.updates_per_epoch * 10)
    lrs = [g["lr"] for g in t.optimizer.param_groups]
    from masksub.train.stats import Sums

    rec = t._log_step(Sums(), 0.0)
    assert rec["lr"] == max(lrs) > min(lrs)
    t.log.close()


def test_rsb_pixel_masking_zeroes_what_the_authors_code_zeroes() -> None:
    """augsub resnet_rsb/models.py random_masking, written out: its ``x * mask`` zeroes the
    ``int(L * (1 - r))`` squares of the 'keep' set: 24 of 49 at r = 0.5."""
    from masksub.branches.pixel import mask_pixels

    def theirs(n: int, r: float) -> int:
        x = torch.ones(1, n, 3)
        len_keep = int(n * (1 - r))
        ids_restore = torch.argsort(torch.argsort(torch.rand(1, n), dim=1), dim=1)
        mask = torch.ones(1, n)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return int(((x * mask.unsqueeze(-1)) == 0).all(-1).sum())

    x = torch.ones(2, 3, 224, 224)
    zero = (mask_pixels(x, 0.5, 32) == 0).view(2, 3, 7, 32, 7, 32).all(dim=(1, 3, 5))
    assert zero.flatten(1).sum(1).tolist() == [theirs(49, 0.5)] * 2 == [24, 24]


def test_show_prints_the_new_keys_with_their_sources(capsys) -> None:
    from masksub.cli import main

    assert main(["train", "--recipe", "beitv2-ft-vit-b", "--show", "--data", "synthetic"]) == 0
    out = capsys.readouterr().out
    for key, word in (("re_mode", "--remode"), ("layer_decay_rule", "get_num_layer_for_vit"),
                      ("no_weight_decay", "relative_position_bias_table")):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(key + " "))
        assert word in line, line


@pytest.mark.parametrize("setting, word", [
    ("re_mode=noise", "re_mode"), ("re_count=0", "re_count"), ("layer_decay_rule=mae", "layer_decay_rule"),
    ("pos_embed_resample=bilinear", "pos_embed_resample"), ("cls_token_init_std=-0.02", "cls_token_init_std"),
    ("no_weight_decay=pos_embed", "no_weight_decay"),
])
def test_the_new_keys_refuse_bad_values(tmp_path: Path, capsys, setting: str, word: str) -> None:
    from masksub.cli import main

    rc = main(["train", "--recipe", "mae-ft-vit-b", "--data", "synthetic", "--set", setting,
               "--output", str(tmp_path), "--run-name", "bad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and word in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "bad").exists()


def test_no_weight_decay_list_with_timms_grouping(tmp_path: Path) -> None:
    """``no_weight_decay: []`` under timm's rule decays pos_embed (timm's own list spares it)."""
    over = tiny("mae-ft-vit-b") | {"output": str(tmp_path), "layer_decay_rule": "timm"}
    got = {}
    for nwd in (None, []):
        t = Trainer(C.load("mae-ft-vit-b", over | {"no_weight_decay": nwd, "run_name": f"r{nwd is None}"}))
        names = {id(p): n for n, p in t.model_raw.named_parameters()}
        got[nwd is None] = {names[id(p)]: g["weight_decay"] for g in t.optimizer.param_groups for p in g["params"]}
        t.log.close()
    assert got[True]["pos_embed"] == 0.0 and got[False]["pos_embed"] == 0.05
    assert got[False]["blocks.0.norm1.weight"] == 0.0  # 1-D tensors stay out of weight decay
