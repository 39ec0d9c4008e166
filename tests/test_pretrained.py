"""Finetuning starts: pretrained_file layouts, the load report, refusal of a mostly-random start,
the BEiT v2 mask token, and the two-stage DeiT-III path from a ``masksub train`` checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from masksub.cli import main
from masksub.errors import MaskSubError
from masksub.train import checkpoint
from masksub.train import config as C
from masksub.train.build import build_model, effective_lr
from masksub.train.engine import Trainer
from masksub.train.pretrained import load_pretrained

TINY = dict(pretrained=False, embed_dim=64, depth=2, num_heads=2, img_size=64, num_classes=5)


def test_module_prefix_and_wrapper(tmp_path: Path) -> None:
    src = timm.create_model("vit_tiny_patch16_224", **TINY)
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pth")
    dst = timm.create_model("vit_tiny_patch16_224", **TINY)
    rep = load_pretrained(dst, str(tmp_path / "ddp.pth"), model_name="vit_tiny_patch16_224", verbose=False)
    assert "'module.' stripped" in rep.layout and rep.fraction == 1.0
    assert not rep.missing and not rep.unexpected and len(rep.loaded) == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_mae_checkpoint_counts(tmp_path: Path) -> None:
    """MAE pretraining weights: decoder keys unexpected, head and fc_norm missing (main_finetune.py)."""
    src = timm.create_model("vit_base_patch16_224", **TINY)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    sd |= {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64),
           "decoder_pred.weight": torch.zeros(768, 32)}
    torch.save({"model": sd}, tmp_path / "mae.pth")
    dst = timm.create_model("vit_base_patch16_224", **TINY, global_pool="avg", fc_norm=True)
    rep = load_pretrained(dst, str(tmp_path / "mae.pth"), model_name="vit_base_patch16_224", verbose=False)
    assert set(rep.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert {"decoder_embed.weight", "decoder_pred.weight", "norm.weight", "norm.bias"} <= set(rep.unexpected)
    assert rep.fraction > 0.99 and not rep.mask_token  # MAE's decoder mask token is not ours
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_openai_clip_layout_through_timms_filter(tmp_path: Path) -> None:
    """OpenAI CLIP ``visual.*`` keys become timm's through timm's checkpoint_filter_fn; with QuickGELU
    the tokens out of the blocks equal the CLIP tower's (FT-CLIP's model)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    clip = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=64),
                text_cfg=CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=1, layers=1), quick_gelu=True)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    name = "vit_base_patch16_clip_quickgelu_224"
    vit = timm.create_model(name, **TINY, global_pool="avg", fc_norm=False)
    rep = load_pretrained(vit, str(tmp_path / "clip.pt"), model_name=name, exclude=["norm."], verbose=False)
    assert "checkpoint_filter_fn" in rep.layout and rep.fraction > 0.99
    assert set(rep.missing) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}  # ln_post left out
    got, want = {}, {}
    vit.blocks.register_forward_hook(lambda m, i, o: got.setdefault("x", o))
    clip.visual.transformer.register_forward_hook(lambda m, i, o: want.setdefault("x", o))
    x = torch.randn(2, 3, 64, 64)
    vit.eval(), clip.eval()
    with torch.no_grad():
        vit(x), clip.visual(x)
    w = want["x"] if want["x"].shape[0] == 2 else want["x"].transpose(0, 1)
    assert torch.allclose(got["x"], w, atol=1e-5)


def test_mostly_random_start_is_refused(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=5).state_dict(), tmp_path / "r.pth")
    vit = timm.create_model("vit_tiny_patch16_224", **TINY)
    with pytest.raises(MaskSubError, match=r"Only 0\.0% of VisionTransformer's backbone"):
        load_pretrained(vit, str(tmp_path / "r.pth"), model_name="vit_tiny_patch16_224", verbose=False)
    half = {k: v for k, v in vit.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(half, tmp_path / "half.pth")
    with pytest.raises(MaskSubError, match="missing"):
        load_pretrained(vit, str(tmp_path / "half.pth"), min_loaded=0.9, verbose=False)
    assert load_pretrained(vit, str(tmp_path / "half.pth"), min_loaded=0.3, verbose=False).fraction < 0.9
    with pytest.raises(MaskSubError, match="does not exist"):
        load_pretrained(vit, str(tmp_path / "nope.pth"))


def test_beitv2_mask_token_becomes_the_sub_branch_token(tmp_path: Path) -> None:
    over = {"model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}, "img_size": 64, "num_classes": 5,
            "data": "synthetic", "synthetic_size": 4, "synthetic_val_size": 2, "batch_size": 2,
            "tensorboard": False, "progress": False, "output": str(tmp_path), "amp": "none",
            "head_init_scale": None}
    src = build_model(C.load("beitv2-ft-vit-b", over))
    token = torch.randn(1, 1, 32)
    torch.save({"model": src.state_dict() | {"mask_token": token}}, tmp_path / "beit.pth")
    t = Trainer(C.load("beitv2-ft-vit-b", over | {"pretrained_file": str(tmp_path / "beit.pth")}))
    assert torch.equal(t.model_raw.masksub_mask_token.detach(), token.flatten())
    assert any(p is t.model_raw.masksub_mask_token for p in t.model_raw.parameters())
    x = torch.randn(2, 3, 64, 64)
    t.model_raw.eval()
    with torch.no_grad():  # the sub-branch's masked tokens are this token: changing it changes its output
        torch.manual_seed(0)
        a = t.ms.forward_sub(x)
        t.model_raw.masksub_mask_token.add_(torch.randn(32))  # a constant vanishes in LayerNorm
        torch.manual_seed(0)
        b = t.ms.forward_sub(x)
    assert not torch.allclose(a, b)
    t.log.close()
    base = Trainer(C.load("beitv2-ft-vit-b", over | {"pretrained_file": str(tmp_path / "beit.pth"), "sub": "none"}))
    assert not hasattr(base.model_raw, "masksub_mask_token")  # the baseline gets no unused parameter
    base.log.close()


def test_deit3_authors_layout(tmp_path: Path) -> None:
    """augsub / DeiT ``models_v2.py`` checkpoints name LayerScale ``gamma_1``/``gamma_2`` (timm: ls1.gamma)."""
    name = "deit3_base_patch16_224"
    src = timm.create_model(name, **TINY)
    sd = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in src.state_dict().items()}
    assert "blocks.0.gamma_1" in sd
    torch.save({"model": sd}, tmp_path / "deit3.pth")
    dst = timm.create_model(name, **TINY)
    rep = load_pretrained(dst, str(tmp_path / "deit3.pth"), model_name=name, verbose=False)
    assert not rep.missing and not rep.unexpected and rep.fraction == 1.0
    assert torch.equal(dst.blocks[1].ls2.gamma, src.blocks[1].ls2.gamma)


def test_beit_shared_rel_pos_table_goes_to_every_block(tmp_path: Path) -> None:
    """BEiT v2 pretraining checkpoints share one relative-position table (beit2 run_class_finetuning.py)."""
    name = "beitv2_base_patch16_224"
    src = timm.create_model(name, **TINY)
    sd = {k: v for k, v in src.state_dict().items() if "relative_position_bias_table" not in k}
    table = torch.randn_like(src.blocks[0].attn.relative_position_bias_table)
    torch.save({"model": sd | {"rel_pos_bias.relative_position_bias_table": table}}, tmp_path / "pt.pth")
    dst = timm.create_model(name, **TINY)
    rep = load_pretrained(dst, str(tmp_path / "pt.pth"), model_name=name, verbose=False)
    assert "shared relative-position table" in rep.layout and not rep.missing and not rep.unexpected
    for b in dst.blocks:
        assert torch.equal(b.attn.relative_position_bias_table, table)


def test_lr_follows_the_global_batch(capsys: pytest.CaptureFixture) -> None:
    mae = C.load("mae-ft-vit-b", {"data": "synthetic"})
    assert effective_lr(mae, world=8)[:3] == (mae.lr, mae.warmup_lr, mae.min_lr)  # 128 x 8 = 1024
    lr, _, _, note = effective_lr(mae, world=2)  # 256: linear, MAE's rule
    assert lr == pytest.approx(2e-3 * 256 / 1024) and "scaled linearly" in note
    swin = C.load("swin-t", {"data": "synthetic", "batch_size": 64})
    assert effective_lr(swin, world=8)[:3] == pytest.approx((5e-4, 5e-7, 5e-6))  # Swin main.py x 512/1024
    deit = C.load("deit3-vit-b-400", {"data": "synthetic"})
    lr, _, _, note = effective_lr(deit, world=1)
    assert lr == deit.lr and "NOT the published setting" in note
    assert effective_lr(deit, world=8)[3] == ""
    assert effective_lr(C.load("deit3-vit-b-400", {"data": "synthetic", "accum_steps": 8}), world=1)[3] == ""


TWO_STAGE = ["--data", "synthetic", "--set", "synthetic_size=8", "--set", "synthetic_val_size=4",
             "--batch-size", "4", "--epochs", "1", "--set", "model_kwargs.depth=2",
             "--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.num_heads=2", "--set", "num_classes=10",
             "--amp", "none", "--no-progress", "--set", "tensorboard=false", "--set", "threads=1"]


def test_deit3_two_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Stage 1 (deit3-vit-b-400 at a small size) -> the 224-stage recipe (here 64 px) from its
    ``masksub train`` checkpoint: position embeddings resampled, everything else loaded, MaskSub on."""
    assert main(["train", "--recipe", "deit3-vit-b-400", *TWO_STAGE, "--set", "img_size=48",
                 "--set", "repeated_aug=0", "--output", str(tmp_path), "--run-name", "stage1"]) == 0
    s1 = checkpoint.load(tmp_path / "stage1")["model"]
    capsys.readouterr()
    assert main(["train", "--recipe", "deit3-vit-b-ft224", *TWO_STAGE, "--set", "img_size=64",
                 "--set", f"pretrained_file={tmp_path / 'stage1'}", "--output", str(tmp_path),
                 "--run-name", "ft"]) == 0
    err = capsys.readouterr().err
    assert "masksub checkpoint" in err and "missing 0" in err and "shape mismatch 0" in err
    cfg = C.from_dict(json.loads(json.dumps(checkpoint.load(tmp_path / "ft")["config"])))
    assert (cfg.img_size, cfg.opt, cfg.lr, cfg.sub) == (64, "adamw", 1e-5, "mask")
    start = build_model(cfg)  # the fine-tune's starting weights, as the run built them
    assert torch.equal(start.blocks[1].attn.qkv.weight, s1["blocks.1.attn.qkv.weight"])
    assert torch.equal(start.head.weight, s1["head.weight"])
    assert s1["pos_embed"].shape[1] == 9 and start.pos_embed.shape[1] == 16  # 3x3 -> 4x4, patch tokens only
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["top1"] is not None and summary["ratio"] == 0.5
    # resume and eval need only the run's own checkpoint, not the stage-1 file any more
    (tmp_path / "stage1" / "last.pt").rename(tmp_path / "moved.pt")
    assert main(["train", "--resume", str(tmp_path / "ft"), "--epochs", "2"]) == 0
    assert checkpoint.load(tmp_path / "ft")["epoch"] == 2
    assert main(["eval", "--checkpoint", str(tmp_path / "ft" / "last.pt"), "--data", "synthetic"]) == 0
