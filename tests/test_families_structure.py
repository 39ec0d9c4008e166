"""Families decided by structure, never by a name or a shape coincidence; counted from outside,
with forward hooks on the model's own modules (not from the family's own report)."""

from __future__ import annotations

import subprocess
import sys
import types
import warnings

import pytest
import torch
from conftest import tiny_vit
from torch import nn

from masksub import MaskSub, MaskSubError
from masksub.branches import DropSub, PathSub, build_branch, get_family, register_family
from masksub.branches.base import Family
from masksub.branches.mask_token import TOKEN_NAME
from masksub.cli import main as cli_main
from masksub.inspect import inspect_model

warnings.filterwarnings("ignore", category=UserWarning)


def token_cells(t: torch.Tensor, token: torch.Tensor, axis: int) -> float:
    """Fraction of the positions of ``t`` whose vector along ``axis`` is exactly the mask token."""
    v = t.movedim(axis, -1)
    return (v == token.to(v.dtype)).all(-1).float().mean().item()


def input_of(module: nn.Module, run) -> torch.Tensor:
    """What ``module`` (one of the model's own) was given during ``run()``."""
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        run()
    finally:
        h.remove()
    return seen[0]


def sub_run(model, x, **kw):
    ms = MaskSub(model, "mask", 0.5, **kw)
    model.train()

    def run():
        with torch.no_grad():
            ms.forward_sub(x)
    return ms, run


class NHWCStem(nn.Module):
    """conv -> NHWC -> nn.LayerNorm, as MambaOut's stem; C == H == W at 64 px."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, 4)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class NHWCNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = NHWCStem()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((1, 2)))


def test_stem_layout_is_read_from_the_norm_when_c_equals_h_equals_w():
    model = NHWCNet()
    x = torch.randn(2, 3, 64, 64)
    ms, run = sub_run(model, x)
    assert ms.branch.name == "stem"
    seen = input_of(model.body, run)  # (2, 16, 16, 16): C == H == W
    assert seen.shape == (2, 16, 16, 16)
    assert token_cells(seen, getattr(model, TOKEN_NAME), -1) == pytest.approx(0.5)


def test_mambaout_stem_cells_masked_after_its_nhwc_norm():
    import timm

    model = timm.create_model("mambaout_femto", num_classes=3, depths=(1, 1, 1, 1), dims=(64, 32, 32, 32))
    x = torch.randn(2, 3, 64, 64)
    ms, run = sub_run(model, x)
    seen = input_of(model.stem.act, run)  # after norm1 (NHWC), permuted back: (2, 32, 32, 32)
    assert seen.shape == (2, 32, 32, 32)
    assert token_cells(seen, getattr(model, TOKEN_NAME), 1) == pytest.approx(0.5)


def _checked(reports, family):
    by = {r.mode: r for r in reports}
    assert by["mask"].family == family and by["mask"].why, by["mask"]
    for r in reports:
        if r.family is None:
            continue
        assert r.restored and r.sub_equals_main is False, (r.mode, r.warnings)
        assert r.grad_ratio is not None and r.grad_ratio <= 100, (r.mode, r.grad_ratio)
    return by


def test_hf_swin_is_masked_after_its_patch_embedding_norm():
    from transformers import SwinConfig, SwinForImageClassification

    model = SwinForImageClassification(SwinConfig(
        image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4, num_labels=3,
        drop_path_rate=0.1, hidden_dropout_prob=0.1))
    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    _checked(inspect_model(model, x, torch.tensor([0, 1]), repeats=0), "stem")
    ms, run = sub_run(model, x)
    seen = input_of(model.swin.embeddings.dropout, run)  # (B, N, C) tokens after embeddings.norm
    assert token_cells(seen, getattr(model, TOKEN_NAME), -1) == pytest.approx(0.5)


@pytest.mark.parametrize("name,kw", [
    ("pvt_v2_b0", dict(depths=(1, 1, 1, 1))),
    ("twins_svt_small", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))),
    ("twins_pcpvt_small", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))),
])
def test_conv_layernorm_patch_embeddings_under_other_names(name, kw):
    import timm

    model = timm.create_model(name, num_classes=3, drop_path_rate=0.1, **kw)
    (rep,) = inspect_model(model, batch=2, repeats=0, modes=("mask",))
    assert rep.family == "stem" and not rep.warnings, rep
    assert rep.grad_ratio < 100
    assert build_branch(model, "mask", family="stem").name == "stem"  # no longer refused


def test_hf_segformer_is_a_stem_model():
    from transformers import SegformerConfig, SegformerForImageClassification

    model = SegformerForImageClassification(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
        decoder_hidden_size=32, num_labels=3, patch_sizes=[7, 3], strides=[4, 2]))
    _checked(inspect_model(model, {"pixel_values": torch.randn(2, 3, 64, 64)}, torch.tensor([0, 1]),
                           repeats=0, modes=("mask",)), "stem")


class SkippedDropPath(nn.Module):
    """A drop_path slot its forward never runs, and head dropout that is on (GhostNetV2-like)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop_path = nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.drop(self.conv(x).mean((2, 3))))


def test_pathsub_refuses_when_no_drop_path_runs():
    model = SkippedDropPath()
    ms = MaskSub(model, "droppath")
    with pytest.raises(MaskSubError, match="none of them ran"):
        ms.backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    (rep,) = inspect_model(model, batch=2, image_size=32, repeats=0, modes=("droppath",))
    assert rep.warnings and "none of them ran" in rep.warnings[0]


def test_sub_equals_main_is_not_blinded_by_dropout():
    model = SkippedDropPath()  # dropout 0.5 on: two forwards differ whatever the sub-branch does
    (rep,) = inspect_model(model, batch=2, image_size=32, repeats=0, modes=("mask",), mask_fn=lambda m, x, r: x)
    assert rep.sub_equals_main is True and any("drops nothing" in w for w in rep.warnings)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "mixer_s16_224"])
def test_inspect_image_size_checked_before_the_first_forward(name, capsys):
    """A model built for another size than the batch (here by the user's own --kw)."""
    assert cli_main(["inspect", name, "--modes", "mask", "--batch", "2", "--kw", "img_size=224"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "64x64" in err and "224x224" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,bad", [
    (["resnet18", "--kw", "layerz=2"], "layerz"),
    (["vit_tiny_patch16_224", "--img-size", "50", "--kw", "img_size=224"], "50x50"),
    (["resnet18", "--batch", "0"], "--batch"),
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["resnet18", "--img-size", "0"], "--img-size"),
])
def test_inspect_bad_input_is_one_line(argv, bad, capsys):
    assert cli_main(["inspect", *argv, "--modes", "mask"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad in err and "Traceback" not in err, err


def test_hybrid_vit_says_what_it_removes_and_saves():
    import timm

    model = timm.create_model("vitamin_small_224", num_classes=3, img_size=64, depth=1)
    (rep,) = inspect_model(model, batch=2, repeats=0, modes=("mask",))
    tokens = {}
    for key, sub in (("main", False), ("sub", True)):
        ms = MaskSub(model, "mask")

        def run(sub=sub, ms=ms):
            with torch.no_grad():
                (ms.forward_sub if sub else model)(torch.randn(2, 3, 64, 64))
        tokens[key] = input_of(model.blocks[0], run).shape[1]
    n = tokens["main"] - model.num_prefix_tokens  # 16 tokens behind the stride-16 conv stem
    assert f"keeps {tokens['sub'] - model.num_prefix_tokens} of {n} patch tokens" in rep.does
    assert "conv stem" in rep.does and rep.expected_cost == 1.0


def test_zero_initialised_head_is_said_not_warned():
    from timm.models.mlp_mixer import MlpMixer

    model = MlpMixer(num_classes=3, img_size=64, patch_size=16, num_blocks=1, embed_dim=32)
    assert not model.head.weight.any()
    reports = inspect_model(model, batch=2, repeats=0, modes=("mask",))
    (rep,) = reports
    assert rep.sub_equals_main is False and not rep.warnings, rep.warnings
    assert any("zero-initialised" in n for n in rep.notes)


def _slot_names(model, mode="dropout"):
    slots, _ = DropSub().slots(model)
    ids = {id(m) for m, _ in slots}
    return {n for n, m in model.named_modules() if id(m) in ids}


@pytest.mark.parametrize("kind,want", [
    ("gpt2", {"transformer.h.0.attn.resid_dropout", "transformer.h.0.mlp.dropout"}),
    ("albert", {"albert.encoder.albert_layer_groups.0.albert_layers.0.attention.output_dropout",
                "albert.encoder.albert_layer_groups.0.albert_layers.0.dropout"}),
    ("modernbert", {"model.layers.0.attn.out_drop"}),
])
def test_dropsub_residual_scope_of_text_models(kind, want):
    import transformers as tf

    small = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=2, num_labels=3)
    if kind == "gpt2":
        model = tf.GPT2ForSequenceClassification(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                               num_labels=3, pad_token_id=0))
    elif kind == "albert":
        model = tf.AlbertForSequenceClassification(tf.AlbertConfig(hidden_size=32, embedding_size=16,
                                                                   intermediate_size=64, **small))
    else:
        model = tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
            hidden_size=32, intermediate_size=64, attention_dropout=0.1, mlp_dropout=0.1, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **small))
    names = _slot_names(model)
    assert want <= names, names


def test_hf_dinov2_removes_tokens_in_its_embedding_slot():
    from transformers import Dinov2Config, Dinov2ForImageClassification

    model = Dinov2ForImageClassification(Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16, num_labels=3))
    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    by = _checked(inspect_model(model, x, torch.tensor([0, 1]), repeats=0, modes=("mask",)), "hf_vit")
    assert by["mask"].flop_ratio < 0.9  # the patch embedding, a large part of so tiny a model, runs in full
    ms, run = sub_run(model, x)
    assert input_of(model.dinov2.encoder.layer[0], run).shape[1] == 1 + 8  # class token + 8 of 16


def test_naflexvit_removes_tokens():
    import timm

    model = timm.create_model("naflexvit_base_patch16_gap", num_classes=3, depth=1, embed_dim=32, num_heads=2)
    x = torch.randn(2, 3, 64, 64)
    (rep,) = inspect_model(model, batch=2, repeats=0, modes=("mask",))
    assert rep.family == "vit" and not rep.warnings, rep
    ms, run = sub_run(model, x)
    main = input_of(model.blocks[0], lambda: model(x)).shape[1]
    assert input_of(model.blocks[0], run).shape[1] == main - 8


def test_text_family_without_a_mask_token_names_the_way_out():
    tok = types.SimpleNamespace(mask_token_id=None, all_special_ids=[0], pad_token_id=None)
    with pytest.raises(MaskSubError) as e:
        get_family("text")(tokenizer=tok)
    assert "mask_token_id=" in str(e.value) and "mode='dropout'" in str(e.value)
    assert "pass tokenizer=" not in str(e.value)


def test_pathsub_and_dropsub_words_for_a_vgg():
    import timm

    with torch.device("meta"):
        model = timm.create_model("vgg11", num_classes=3)
    with pytest.raises(MaskSubError) as e:
        PathSub().prepare(model)
    assert "build it with drop_path_rate" not in str(e.value) and "VGG" in str(e.value)
    assert DropSub().slots(model)[1] != "residual"  # its head MLP's dropout is not a residual branch's


def test_inspect_reachable_after_plain_import():
    code = "import masksub; print(masksub.inspect.inspect_model.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect_model" in out.stdout, out.stderr


def test_a_repeated_family_name_is_refused():
    class Pixel2(Family):
        name = "pixel"

    with pytest.raises(MaskSubError, match="already registered"):
        register_family(Pixel2)
    assert get_family("pixel").__name__ == "PixelMask"


def test_every_family_carries_what_is_known_of_it():
    from masksub.branches import family_names

    for name in family_names():
        cls = get_family(name)
        assert cls.why and 0 < cls.cost <= 1.0 and isinstance(cls.priority, int), name
    assert get_family("open_clip_vit").cost == 0.5


def test_tiny_vit_still_detected_first():
    assert build_branch(tiny_vit(img_size=32), "mask").name == "vit"


def test_ghostnetv2_pathsub_is_refused_with_the_reason():
    import timm

    model = timm.create_model("ghostnetv2_100", num_classes=3)  # drop_rate=0: its drop_path slot never runs
    (rep,) = inspect_model(model, batch=2, repeats=0, modes=("droppath",))
    assert rep.family is None and "none of them ran" in rep.does, rep


class UnusedMlpDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 4))
        self.mlp.drop = nn.Dropout(0.1)  # a residual-scope slot its forward never calls
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.mlp[0](x))


def test_dropsub_refuses_dropouts_that_never_run():
    model = UnusedMlpDropout()
    ms = MaskSub(model, "dropout")
    with pytest.raises(MaskSubError, match="none of them ran"):
        ms.backward(torch.randn(2, 4), torch.tensor([0, 1]), nn.CrossEntropyLoss())
