"""The training steps ``masksub bench`` times, one model copy each.

- ``standard``: a plain loop with no masksub code (forward, loss, backward, optimizer step).
- ``paper``: the paper's official recipe, written here independently of masksub: the model is
  called with a mask ratio, masking is MAE's argsort ``random_masking``, and the two losses
  are backpropagated one after the other (gradient accumulation, as the paper's code does).
- ``masksub``: ``MaskSub(model, mode, order=...)`` from this package.
- ``off``: ``MaskSub(model, mode=None)``, the masksub step with the sub-branch off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MaskSubError

VARIANTS = ("standard", "off", "paper", "masksub")
# Pieces of a step, timed alone to show where the time goes: the main forward+backward, the
# sub forward+backward (masking included), the optimizer step.
PARTS = ("part_main", "part_sub", "part_opt")


@dataclass(frozen=True)
class ModelSpec:
    """A timm model and the batch the reference figures (measured on an H200, benchmarks/README.md) use for it."""

    timm_name: str
    batch: int
    img: int = 224
    num_classes: int = 1000
    kwargs: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "vit_s": ModelSpec("vit_small_patch16_224", 256),
    "vit_b": ModelSpec("vit_base_patch16_224", 128),
    "vit_l": ModelSpec("vit_large_patch16_224", 64),
    "resnet50": ModelSpec("resnet50", 128),
    "swin_t": ModelSpec("swin_tiny_patch4_window7_224", 128),
    # Tiny stand-ins with the same code paths, for CPU runs and the test suite.
    "tiny_vit": ModelSpec("vit_small_patch16_224", 8, 32, 10,
                          dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)),
    # A ViT big enough for a CPU to be compute-bound (144 tokens, width 192), still no GPU.
    "small_vit": ModelSpec("vit_small_patch16_224", 16, 96, 10,
                           dict(img_size=96, patch_size=8, embed_dim=192, depth=4, num_heads=3)),
    "tiny_resnet": ModelSpec("resnet18", 8, 64, 10, dict(layers=(1, 1, 1, 1))),
    "tiny_swin": ModelSpec("swin_tiny_patch4_window7_224", 8, 64, 10,
                           dict(img_size=64, window_size=4, embed_dim=32, depths=(1, 1), num_heads=(1, 2))),
}
GPU_MODELS = ("vit_s", "vit_b", "vit_l", "resnet50", "swin_t")
TINY_MODELS = ("tiny_vit", "tiny_resnet", "tiny_swin")


def build_model(name: str, drop_path: float = 0.1) -> nn.Module:
    """A timm model from its config (``pretrained=False``: no download), in train mode."""
    import timm

    if name not in MODELS:
        raise MaskSubError(f"unknown bench model {name!r}; pick from {', '.join(MODELS)}")
    spec = MODELS[name]
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=spec.num_classes,
                              drop_path_rate=drop_path, **spec.kwargs)
    return model.train()


# -- the paper's recipe, independent of masksub ---------------------------------------------
def mae_random_masking(x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor]:
    """MAE's ``random_masking``: argsort of noise, keep the first ``len_keep``; returns
    (kept tokens, mask with 1 = removed, in the original order)."""
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask


class PaperRecipeModel(nn.Module):
    """The network as the paper's code calls it: ``model(x, mask_ratio=r)``.

    ViT: MAE token removal after the position embedding (prefix tokens kept). Swin: mask token
    on 32 px regions after the patch embedding. CNN: 32 px pixel squares set to zero.
    """

    def __init__(self, model: nn.Module, region_px: int = 32) -> None:
        super().__init__()
        self.model = model
        name = type(model).__name__
        if name == "VisionTransformer":
            self.kind = "vit"
        elif name.startswith("SwinTransformer"):
            self.kind = "swin"
            dim = model.patch_embed.proj.out_channels
            self.mask_token = nn.Parameter(torch.zeros(dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        elif any(isinstance(m, nn.Conv2d) for m in model.modules()):
            self.kind = "pixel"
        else:
            raise MaskSubError(f"the paper-recipe reference has no masking for {name}; use variant masksub")
        self.region_px = region_px

    def forward(self, x: Tensor, mask_ratio: float = 0.0) -> Tensor:
        m = self.model
        if mask_ratio == 0.0:
            return m(x)
        if self.kind == "vit":
            x = m.patch_embed(x)
            x = m._pos_embed(x)
            p = m.num_prefix_tokens
            kept, _ = mae_random_masking(x[:, p:], mask_ratio)
            x = torch.cat([x[:, :p], kept], dim=1)
            x = m.norm(m.blocks(m.norm_pre(x)))
            return m.forward_head(x)
        b, _, h, w = x.shape
        gh, gw = h // self.region_px, w // self.region_px
        _, mask = mae_random_masking(x.new_zeros(b, gh * gw, 1), mask_ratio)
        mask = mask.view(b, 1, gh, gw)
        if self.kind == "pixel":
            mask = mask.repeat_interleave(self.region_px, 2).repeat_interleave(self.region_px, 3)
            return m(x * (1 - mask.to(x.dtype)))
        x = m.patch_embed(x)  # NHWC
        r = x.shape[1] // gh
        mask = mask.repeat_interleave(r, 2).repeat_interleave(r, 3).permute(0, 2, 3, 1).to(x.dtype)
        x = x * (1 - mask) + self.mask_token.to(x.dtype) * mask
        return m.forward_head(m.norm(m.layers(x)))


def soft_ce(sub: Tensor, main: Tensor) -> Tensor:
    return torch.sum(-F.softmax(main.detach().float(), dim=-1) * F.log_softmax(sub.float(), dim=-1), dim=-1).mean()


# -- steps ------------------------------------------------------------------------------------
@dataclass
class Step:
    """One setting, ready to time: ``run()`` is a whole optimizer step; ``count()`` runs the
    same work eagerly for the FLOP counter; ``main``/``sub`` are the two forwards."""

    run: Callable[[], None]
    count: Callable[[], None]
    main: Callable[[], Tensor]
    sub: Callable[[], Tensor] | None
    params: list[nn.Parameter]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_step(variant: str, model: nn.Module, x: Tensor, y: Tensor, *, mode: str = "mask",
              order: str = "memory", ratio: float | None = None, compile: bool = False,
              compile_backend: str = "inductor", amp_dtype: torch.dtype | None = torch.bfloat16, family: str | None = None,
              make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> Step:
    """Wire ``variant`` around ``model``; the optimizer is built after any parameter is added.
    ``compile_backend``: inductor for timings; ``eager`` only traces (a CPU rehearsal of the
    compiled rows' graphs and checks without code generation)."""
    from ..step import MaskSub

    dev = x.device
    crit = nn.CrossEntropyLoss()
    ac = (lambda: _autocast(dev, amp_dtype))  # noqa: E731

    if variant == "standard":
        fast = torch.compile(model, backend=compile_backend) if compile else model
        params = list(model.parameters())
        opt = make_optimizer(params)

        def body(net: nn.Module) -> None:
            with ac():
                loss = crit(net(x), y)
            loss.backward()

        def run() -> None:
            body(fast)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return Step(run, lambda: body(model), lambda: model(x), None, params)

    if variant == "paper":
        if mode != "mask":
            raise MaskSubError("the paper-recipe reference is for mode 'mask' only")
        r = 0.5 if ratio is None else ratio
        ref = PaperRecipeModel(model).to(dev)
        fast = torch.compile(ref, backend=compile_backend) if compile else ref
        params = list(ref.parameters())
        opt = make_optimizer(params)

        def body(net: nn.Module) -> None:
            with ac():
                o1 = net(x)
                loss1 = crit(o1, y) / 2
            loss1.backward()
            with ac():
                o2 = net(x, mask_ratio=r)
                loss2 = soft_ce(o2, o1) / 2
            loss2.backward()

        def run() -> None:
            body(fast)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return Step(run, lambda: body(ref), lambda: ref(x), lambda: ref(x, mask_ratio=r), params)

    if variant in ("masksub", "off"):
        fast = torch.compile(model, backend=compile_backend) if compile else model
        on = variant == "masksub"
        kw: dict[str, Any] = dict(mode=mode, ratio=ratio, order=order, family=family) if on else dict(mode=None)
        ms = MaskSub(fast, amp_dtype=amp_dtype, **kw)  # may add a mask token: before the optimizer
        eager = MaskSub(model, amp_dtype=amp_dtype, **kw)
        params = list(model.parameters())
        opt = make_optimizer(params)

        def run() -> None:
            ms.backward(x, y, crit)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return Step(run, lambda: eager.backward(x, y, crit), lambda: eager.forward_main(x),
                    (lambda: eager.forward_sub(x)) if on else None, params)

    if variant in PARTS:
        params = list(model.parameters())
        ms = (MaskSub(model, mode=mode, ratio=ratio, amp_dtype=amp_dtype, family=family)
              if variant == "part_sub" else None)
        if ms is not None:
            params = list(model.parameters())  # a mask token may have been added
        opt = make_optimizer(params)
        if variant == "part_opt":
            def run_opt() -> None:
                if params[0].grad is None:  # gradients of a step, made once
                    for p in params:
                        p.grad = torch.randn_like(p) * 1e-3
                opt.step()

            return Step(run_opt, lambda: None, lambda: model(x), None, params)
        net = torch.compile(model, backend=compile_backend) if compile else model
        with torch.no_grad(), ac():
            target = model(x).float()  # the main branch's logits, fixed

        def body_part(m: nn.Module) -> None:
            if ms is None:
                with ac():
                    loss = crit(m(x), y)
            else:
                with ms.sub(), ac():
                    loss = soft_ce(m(x), target)
            loss.backward()

        def run_part() -> None:
            body_part(net)
            opt.zero_grad(set_to_none=True)

        sub = None if ms is None else (lambda: ms.forward_sub(x))
        return Step(run_part, lambda: body_part(model), lambda: model(x), sub, params)

    raise MaskSubError(f"unknown variant {variant!r}; pick from {', '.join(VARIANTS + PARTS)}")
