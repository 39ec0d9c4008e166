"""The family sweep: one small model from every timm model module and the Hugging Face image and
text classification heads, with the family each must get. ``tests/test_family_sweep.py`` builds
and inspects every one; ``scripts/family_table.py`` writes README's table from ``TIMM`` and ``HF``
(so the table says what the sweep checks)."""

from __future__ import annotations

from typing import Any

import torch

IMG = 64
REFUSED = "refused"  # no mask family fits (a linear patch embedding, no conv): said with a message
V = dict(depth=1, embed_dim=32, num_heads=2)
VI = dict(V, img_size=IMG)
S4 = dict(depths=(1, 1, 1, 1))

# timm module -> (model, builder keywords, mask family). One model per module, the smallest
# (fewest parameters) where the builder takes no size keywords.
TIMM: dict[str, tuple[str, dict[str, Any], str]] = {
    "beit": ("beitv2_base_patch16_224", VI, "beit"),
    "byoanet": ("botnet26t_256", dict(img_size=IMG), "pixel"),
    "byobnet": ("test_byobnet", {}, "pixel"),
    "cait": ("cait_xxs24_224", dict(VI, depth_token_only=1), "cait"),
    "coat": ("coat_tiny", dict(img_size=IMG, embed_dims=(32, 32, 32, 32), serial_depths=(1, 1, 1, 1),
                               parallel_depth=0, num_heads=8), "stem"),
    "convit": ("convit_tiny", dict(VI, local_up_to_layer=1), "pixel"),
    "convmixer": ("ConvMixer", dict(dim=32, depth=1, kernel_size=3, patch_size=4), "pixel"),
    "convnext": ("test_convnext", {}, "stem"),
    "cpubone": ("cpubone_nano", {}, "pixel"),
    "crossvit": ("CrossVit", dict(img_size=96, img_scale=(1.0, 1.0), patch_size=(12, 16), embed_dim=(16, 32),
                                  depth=((1, 1, 0),), num_heads=(1, 1), mlp_ratio=(2, 2, 1)), "pixel"),
    "csatv2": ("csatv2", {}, "pixel"),
    "cspnet": ("cs3darknet_focus_s", {}, "pixel"),
    "cspnext": ("cspnext_tiny", {}, "pixel"),
    "davit": ("davit_tiny", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 64), num_heads=(1, 1, 1, 1)), "stem"),
    "deepseek_vit": ("deepseek_vit_412m", dict(V, img_size=224), "pixel"),
    "deit": ("deit_tiny_patch16_224", VI, "vit"),
    "densenet": ("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1)), "pixel"),
    "dla": ("dla46x_c", {}, "pixel"),
    "dpn": ("dpn48b", {}, "pixel"),
    "edgenext": ("edgenext_xx_small", dict(S4, dims=(16, 32, 32, 64), heads=(1, 1, 1, 1)), "stem"),
    "efficientformer": ("EfficientFormer", dict(depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 32), num_vit=1),
                        "pixel"),
    "efficientformer_v2": ("efficientformerv2_s0", dict(img_size=IMG), "pixel"),
    "efficientnet": ("test_efficientnet", {}, "pixel"),
    "efficientvim": ("efficientvim_m1", {}, "pixel"),
    "efficientvit_mit": ("efficientvit_b0", {}, "pixel"),
    "efficientvit_msra": ("efficientvit_m0", dict(img_size=IMG), "pixel"),
    "eva": ("vit_tiny_patch16_dinov3_qkvb", VI, "vit"),
    "fasternet": ("fasternet_t0", {}, "pixel"),
    "fastvit": ("fastvit_t8", {}, "pixel"),
    "focalnet": ("FocalNet", dict(depths=(1, 1, 1, 1), embed_dim=16), "stem"),
    "gcvit": ("GlobalContextVit", dict(img_size=IMG, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
              "stem"),
    "gemma4_vit": ("gemma4_vit_167m_enc", dict(V, img_size=IMG, global_pool="avg"), REFUSED),
    "ghostnet": ("ghostnetv2_100", {}, "pixel"),
    "hardcorenas": ("hardcorenas_b", {}, "pixel"),
    "hgnet": ("hgnetv2_b0", {}, "pixel"),
    "hiera": ("hiera_tiny_224", dict(img_size=(IMG, IMG), embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), "hiera"),
    "hieradet_sam2": ("sam2_hiera_tiny", dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), "pixel"),
    "hrnet": ("hrnet_w18_small", {}, "pixel"),
    "iformer": ("iformer_t", {}, "pixel"),
    "inception_next": ("inception_next_atto", dict(S4, dims=(16, 32, 32, 64)), "pixel"),
    "inception_resnet_v2": ("inception_resnet_v2", {}, "pixel"),
    "inception_v3": ("inception_v3", {}, "pixel"),
    "inception_v4": ("inception_v4", {}, "pixel"),
    "lcnetv2": ("lcnetv2_small", {}, "pixel"),
    "levit": ("levit_128s", dict(img_size=IMG), "pixel"),
    "lowformer": ("lowformer_b0", {}, "pixel"),
    "mambaout": ("test_mambaout", {}, "stem"),
    "maxxvit": ("test_coatnet", dict(img_size=IMG), "pixel"),
    "metaformer": ("MetaFormer", dict(depths=(1, 1, 1, 1), dims=(16, 32, 32, 64)), "stem"),
    "mlp_mixer": ("MlpMixer", dict(img_size=IMG, num_blocks=1, embed_dim=32), "pixel"),
    "mobilenetv3": ("lcnet_035", {}, "pixel"),
    "mobilenetv5": ("mobilenetv5_base", dict(channel_multiplier=0.25), "stem"),
    "mobilevit": ("mobilevit_xxs", {}, "pixel"),
    "mvitv2": ("mvitv2_tiny", dict(img_size=IMG), "pixel"),
    "naflexvit": ("naflexvit_base_patch16_gap", V, "vit"),
    "nasnet": ("nasnetalarge", dict(num_features=192, stem_size=16), "pixel"),
    "nest": ("Nest", dict(img_size=IMG, depths=(1, 1, 1), embed_dims=(16, 32, 64), num_heads=(1, 1, 1)), "pixel"),
    "nextvit": ("nextvit_small", {}, "pixel"),
    "nfnet": ("test_nfnet", {}, "pixel"),
    "pit": ("pit_ti_224", dict(img_size=IMG, depth=(1, 1, 1)), "pixel"),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), "stem"),
    "qwen3_vit": ("qwen3_vit_88m", VI, "pixel"),
    "rdnet": ("rdnet_tiny", {}, "stem"),
    "regnet": ("regnetx_002", {}, "pixel"),
    "repghost": ("repghostnet_050", {}, "pixel"),
    "repvit": ("repvit_m1", {}, "pixel"),
    "res2net": ("res2next50", dict(layers=(1, 1, 1, 1)), "pixel"),
    "resnest": ("resnest14d", {}, "pixel"),
    "resnet": ("test_resnet", {}, "pixel"),
    "resnetv2": ("resnetv2_18", {}, "pixel"),
    "rexnet": ("rexnet_100", {}, "pixel"),
    "selecsls": ("selecsls42", {}, "pixel"),
    "senet": ("legacy_seresnet18", {}, "pixel"),
    "sequencer": ("Sequencer2d", dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(8, 16, 16, 16)),
                  "pixel"),
    "shvit": ("shvit_s1", {}, "pixel"),
    "sknet": ("skresnet18", dict(layers=(1, 1, 1, 1)), "pixel"),
    "starnet": ("starnet_s050", {}, "pixel"),
    "swiftformer": ("swiftformer_xs", {}, "pixel"),
    "swin_transformer": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                                              embed_dim=16, img_size=IMG, window_size=2), "swin"),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", dict(depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                                            embed_dim=16, img_size=IMG, window_size=2), "swin"),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", dict(depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                                          embed_dim=16, img_size=(IMG, IMG), window_size=2), "swin"),
    "tiny_vit": ("tiny_vit_5m_224", dict(depths=(1, 1, 1, 1)), "pixel"),
    "tnt": ("tnt_s_legacy_patch16_224", dict(img_size=IMG, depth=1), "pixel"),
    "tresnet": ("tresnet_m", dict(layers=(1, 1, 1, 1)), "pixel"),
    "twins": ("twins_svt_small", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)), "stem"),
    "vgg": ("vgg11", dict(mlp_ratio=0.01), "pixel"),
    "visformer": ("visformer_tiny", dict(img_size=IMG, depth=(1, 1, 1)), "pixel"),
    "vision_transformer": ("test_vit", {}, "vit"),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", VI, "vit"),
    "vision_transformer_relpos": ("test_vit_relpos", dict(img_size=IMG), "vit_relpos"),
    "vision_transformer_sam": ("samvit_base_patch16_224", dict(VI, global_attn_indexes=()), "pixel"),
    "vitamin": ("vitamin_small_224", dict(img_size=IMG, depth=1), "vit"),
    "volo": ("VOLO", dict(img_size=IMG, layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 1),
                          stem_hidden_dim=16), "pixel"),
    "vovnet": ("ese_vovnet19b_slim_dw", {}, "pixel"),
    "xception": ("legacy_xception", {}, "pixel"),
    "xception_aligned": ("xception41p", {}, "pixel"),
    "xcit": ("xcit_nano_12_p8_224", dict(img_size=IMG, depth=1), "pixel"),
}
# A module that truly cannot be built small on CPU: module -> why.
UNBUILDABLE: dict[str, str] = {
    "pnasnet": "PNASNet5Large, its one model, takes no size argument: 82M parameters at 331 px",
}
# Models that take no 64 px image: their own size (a multiple of the 32 px mask squares where they mask pixels).
SIZE = {"inception_resnet_v2": 96, "inception_v3": 96, "inception_v4": 96, "crossvit": 96, "deepseek_vit": 224,
        "efficientformer": 224}


def build_timm(module: str) -> torch.nn.Module:
    """The module's model, small, with dropout and drop-path where the builder takes them."""
    import timm

    name, kw, _ = TIMM[module]
    if name[0].isupper():  # the module's model class, where its named builders fix a large size
        import importlib

        cls = getattr(importlib.import_module(f"timm.models.{module}"), name)
        for extra in (dict(drop_rate=0.1, drop_path_rate=0.1), dict(drop_rate=0.1), {}):
            try:
                return cls(num_classes=5, **extra, **kw)
            except TypeError as e:
                if not any(f"'{k}'" in str(e) for k in extra):
                    raise
    for extra in (dict(drop_rate=0.1, drop_path_rate=0.1), dict(drop_rate=0.1), {}):
        try:
            return timm.create_model(name, pretrained=False, num_classes=5, **extra, **kw)
        except TypeError as e:
            if not any(f"'{k}'" in str(e) for k in extra):
                raise
    raise AssertionError("unreachable")


def _hf(kind: str) -> tuple[torch.nn.Module, str]:
    import transformers as tf

    t = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_labels=5,
             hidden_dropout_prob=0.1)
    img = dict(t, image_size=IMG, patch_size=16)
    txt = dict(t, vocab_size=64, max_position_embeddings=32, pad_token_id=0)
    hier = dict(num_labels=5, drop_path_rate=0.1)
    make = {
        "vit": lambda: (tf.ViTForImageClassification(tf.ViTConfig(**img)), "hf_vit"),
        "deit": lambda: (tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**img)), "hf_vit"),
        "dinov2": lambda: (tf.Dinov2ForImageClassification(tf.Dinov2Config(**img, drop_path_rate=0.1)), "hf_vit"),
        "beit": lambda: (tf.BeitForImageClassification(tf.BeitConfig(**img, drop_path_rate=0.1)), "pixel"),
        "swin": lambda: (tf.SwinForImageClassification(tf.SwinConfig(
            image_size=IMG, embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4, hidden_dropout_prob=0.1,
            **hier)), "stem"),
        "convnext": lambda: (tf.ConvNextForImageClassification(tf.ConvNextConfig(
            depths=[1, 1], hidden_sizes=[16, 32], num_stages=2, **hier)), "stem"),
        "convnextv2": lambda: (tf.ConvNextV2ForImageClassification(tf.ConvNextV2Config(
            depths=[1, 1], hidden_sizes=[16, 32], num_stages=2, **hier)), "stem"),
        "resnet": lambda: (tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)), "pixel"),
        "segformer": lambda: (tf.SegformerForImageClassification(tf.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
            patch_sizes=[7, 3], strides=[4, 2], **hier)), "stem"),
        "mobilevit": lambda: (tf.MobileViTForImageClassification(tf.MobileViTConfig(
            image_size=IMG, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64], num_labels=5)),
            "pixel"),
        "bert": lambda: (tf.BertForSequenceClassification(tf.BertConfig(**txt)), "text"),
        "roberta": lambda: (tf.RobertaForSequenceClassification(tf.RobertaConfig(**txt)), "text"),
        "deberta-v2": lambda: (tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**txt)), "text"),
        "electra": lambda: (tf.ElectraForSequenceClassification(tf.ElectraConfig(**txt, embedding_size=16)), "text"),
        "distilbert": lambda: (tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=5, pad_token_id=0)), "text"),
        "albert": lambda: (tf.AlbertForSequenceClassification(tf.AlbertConfig(**txt, embedding_size=16)), "text"),
        "modernbert": lambda: (tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
            **{k: v for k, v in txt.items() if k != "hidden_dropout_prob"}, mlp_dropout=0.1, attention_dropout=0.1,
            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)), "text"),
        "gpt2": lambda: (tf.GPT2ForSequenceClassification(tf.GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32, num_labels=5, pad_token_id=0)), "text"),
    }
    return make[kind]()


HF_IMAGE = ["vit", "deit", "dinov2", "beit", "swin", "convnext", "convnextv2", "resnet", "segformer", "mobilevit"]
HF_TEXT = ["bert", "roberta", "deberta-v2", "electra", "distilbert", "albert", "modernbert", "gpt2"]
HF_FAMILY = {"vit": "hf_vit", "deit": "hf_vit", "dinov2": "hf_vit", "beit": "pixel", "swin": "stem",
             "convnext": "stem", "convnextv2": "stem", "resnet": "pixel", "segformer": "stem", "mobilevit": "pixel",
             **{k: "text" for k in HF_TEXT}}


def build_hf(kind: str) -> torch.nn.Module:
    model, family = _hf(kind)
    assert family == HF_FAMILY[kind]
    return model
