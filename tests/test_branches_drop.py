"""DropSub / PathSub set every rate inside the context and restore it after, also on error;
custom hooks; the no-family error."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_resnet, tiny_vit
from torch import nn

from masksub import MaskSub, MaskSubError, sub_branch
from masksub.branches.drop import DropPath, _drop_path_attr


def dropout_rates(model):
    rates = {n: m.p for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    rates.update({f"{n}.drop_rate": m.drop_rate for n, m in model.named_modules()
                  if isinstance(m.__dict__.get("drop_rate"), float)})
    return rates


@pytest.mark.parametrize("make", [
    lambda: tiny_vit(img_size=32, drop_rate=0.1, attn_drop_rate=0.05),
    lambda: tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0),
    lambda: tiny_resnet(drop_rate=0.0),
], ids=["timm_vit", "hf_bert", "timm_resnet_float_rate"])
def test_dropsub_sets_every_dropout_and_restores(make):
    model = make()
    before = dropout_rates(model)
    assert before
    with sub_branch(model, "dropout", 0.3, scope="all"):
        assert set(dropout_rates(model).values()) == {0.3}
    assert dropout_rates(model) == before
    with pytest.raises(KeyError), sub_branch(model, "dropout", 0.3, scope="all"):
        raise KeyError("inside")
    assert dropout_rates(model) == before


def test_dropsub_default_and_step_restores():
    model = tiny_vit(img_size=32, drop_rate=0.1)
    before = dropout_rates(model)
    ms = MaskSub(model, "dropout")
    assert ms.ratio == 0.2
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(model.blocks[0].mlp.drop1.p))
    ms.backward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    assert seen == [0.0, 0.2]  # main forward at the model's own rate, sub at p_sub
    assert dropout_rates(model) == before


def test_dropsub_default_scope_is_the_residual_branch_dropouts():
    """The authors' scope (augsub deit/models_v2.py: attn.proj_drop, mlp.drop): position,
    attention-probability and head dropouts stay at the model's own rate."""
    model = tiny_vit(img_size=32, drop_rate=0.1, pos_drop_rate=0.05, attn_drop_rate=0.05, depth=2)
    before = dropout_rates(model)
    with sub_branch(model, "dropout", 0.3):
        now = dropout_rates(model)
    raised = {n for n in now if now[n] != before[n]}
    assert raised == {f"blocks.{i}.{d}" for i in range(2) for d in ("attn.proj_drop", "mlp.drop1", "mlp.drop2")}


def test_dropsub_residual_scope_of_hf_bert():
    model = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    before = dropout_rates(model)
    with sub_branch(model, "dropout", 0.3):
        now = dropout_rates(model)
    assert {n for n in now if now[n] != before[n]} == {
        "bert.encoder.layer.0.attention.output.dropout", "bert.encoder.layer.0.output.dropout"}


def test_dropsub_leaves_conv_placeholders_alone():
    """timm EfficientViT has a Dropout(0) after every conv (43 in b0): raising them cost up to
    3.2x a main forward; a model without residual-branch dropouts gets its head dropout only."""
    import timm

    model = timm.create_model("efficientvit_b0", pretrained=False, num_classes=3, drop_rate=0.1)
    before = dropout_rates(model)
    assert len(before) > 40
    with sub_branch(model, "dropout", 0.3):
        now = dropout_rates(model)
    assert {n for n in now if now[n] != before[n]} == {"head.classifier.3"}
    with sub_branch(model, "dropout", 0.3, scope="all"):
        assert set(dropout_rates(model).values()) == {0.3}
    with pytest.raises(MaskSubError, match="scope"):
        MaskSub(model, "dropout", scope="every")


def test_dropsub_needs_a_dropout():
    mlp = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(MaskSubError, match="no dropout module"):
        MaskSub(mlp, "dropout")


def path_state(model):
    return {n: (type(m).__name__, getattr(m, "drop_prob", None))
            for n, m in model.named_modules() if n.split(".")[-1].startswith("drop_path")}


def test_pathsub_raises_every_block_including_rate_zero():
    model = tiny_vit(img_size=32, depth=2, drop_path_rate=0.1)
    # timm's linear schedule: block 0 at rate 0 holds nn.Identity, block 1 a DropPath(0.1)
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    before = path_state(model)
    identity = model.blocks[0].drop_path1
    with sub_branch(model, "droppath", 0.25):
        inside = path_state(model)
        assert isinstance(model.blocks[0].drop_path1, DropPath)
    for name, (_, p) in inside.items():
        want = 0.25 if before[name][0] == "Identity" else before[name][1] + 0.25
        assert p == pytest.approx(want), name
    assert path_state(model) == before
    assert model.blocks[0].drop_path1 is identity
    with pytest.raises(OSError), sub_branch(model, "droppath", 0.25):
        raise OSError("disk")
    assert path_state(model) == before
    assert model.blocks[0].drop_path1 is identity


class NoneSlot(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = None

    def forward(self, x):
        y = self.fc(x)
        return x + (y if self.drop_path is None else self.drop_path(y))


def test_pathsub_fills_none_slots_and_restores():
    model = NoneSlot()
    with sub_branch(model, "droppath", 0.5):
        assert isinstance(model.drop_path, DropPath) and model.drop_path.drop_prob == 0.5
        assert model.drop_path.training
    assert model.drop_path is None and "drop_path" not in model._modules


def test_pathsub_other_drop_path_types():
    from torchvision.ops import StochasticDepth

    class HFStyleDropPath(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.drop_prob = p

    assert _drop_path_attr(StochasticDepth(0.1, "row")) == "p"
    assert _drop_path_attr(HFStyleDropPath(0.1)) == "drop_prob"
    seq = nn.Sequential(StochasticDepth(0.1, "row"), HFStyleDropPath(0.2))
    with sub_branch(seq, "droppath", 0.1):
        assert seq[0].p == pytest.approx(0.2) and seq[1].drop_prob == pytest.approx(0.3)
    assert seq[0].p == 0.1 and seq[1].drop_prob == 0.2


def test_pathsub_rate_reaching_one_fails_at_build():
    model = tiny_vit(img_size=32, depth=2, drop_path_rate=0.8)
    with pytest.raises(MaskSubError, match=r"reaches 1"):
        MaskSub(model, "droppath", 0.5)
    with pytest.raises(MaskSubError, match="no drop-path"):
        MaskSub(nn.Linear(2, 2), "droppath")


def test_drop_walk_is_cached():
    model = tiny_vit(img_size=32, depth=2, drop_path_rate=0.1)
    ms = MaskSub(model, "droppath")
    calls = []
    orig = nn.Module.modules

    def counting(self):
        calls.append(1)
        return orig(self)

    nn.Module.modules = counting
    try:
        for _ in range(3):
            with ms.sub():
                pass
    finally:
        nn.Module.modules = orig
    assert calls == []


class RatioNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.ratios = []

    def forward(self, x, mask_ratio: float = 0.0):
        self.ratios.append(mask_ratio)
        return self.fc(x)


def test_custom_forward_with_mask_ratio():
    model = RatioNet()
    ms = MaskSub(model, "mask", 0.4)
    assert ms.branch.name == "custom"
    ms.backward(torch.randn(3, 4), torch.tensor([0, 1, 0]), nn.CrossEntropyLoss())
    assert model.ratios == [0.0, 0.4]


def test_custom_mask_fn():
    model = nn.Sequential(nn.Linear(4, 2))
    got = []

    def mask_fn(m, x, ratio):
        got.append((m, ratio))
        return x * 0

    ms = MaskSub(model, "mask", 0.6, mask_fn=mask_fn)
    x = torch.randn(3, 4)
    sub = ms.forward_sub(x)
    assert got == [(model, 0.6)]
    torch.testing.assert_close(sub, model(torch.zeros(3, 4)))


def test_model_no_family_fits_names_families_and_hook():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(MaskSubError) as e:
        MaskSub(mlp, "mask")
    msg = str(e.value)
    for word in ("vit", "swin", "beit", "pixel", "text", "custom", "mask_fn", "mask_ratio"):
        assert word in msg
    with pytest.raises(MaskSubError, match="mask_fn"):
        MaskSub(mlp, "mask", family="custom")


def test_dropsub_residual_scope_keeps_attention_named_head():
    """CaiT's TalkingHeadAttn is an attention, not a classifier head: its proj_drop is raised;
    ConvNeXt's NormMlpClassifierHead dropout is not, nor the relative-position MLP's of ViT-relpos."""
    import timm

    cait = timm.create_model("cait_xxs24_224", pretrained=False, num_classes=3, depth=1, depth_token_only=1,
                             embed_dim=32, num_heads=2, img_size=32, patch_size=8)
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=3, depths=(1, 1, 1, 1),
                                 dims=(8, 8, 8, 8), drop_rate=0.1)
    relpos = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, num_classes=3, depth=1,
                               embed_dim=32, num_heads=2, img_size=32)
    for model, must, never in ((cait, "blocks.0.attn.proj_drop", None), (convnext, None, "head.drop"),
                               (relpos, "blocks.0.mlp.drop1", "blocks.0.attn.rel_pos.mlp.drop1")):
        before = dropout_rates(model)
        with sub_branch(model, "dropout", 0.3):
            now = dropout_rates(model)
        raised = {n for n in now if now[n] != before[n]}
        assert must is None or must in raised
        assert never is None or never not in raised
