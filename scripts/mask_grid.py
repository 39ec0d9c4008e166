"""Show what a recipe's sub-branch hides: Fashion-MNIST images with the masked units grayed out.

    PYTHONPATH=src python scripts/mask_grid.py OUT.png fmnist-cpu-vit fmnist-cpu-swin ...

One row per recipe, 8 images each (a 0.5 mask ratio unless the recipe says otherwise). What is
masked is read from outside the family code, on the model's own modules: the input the model
first conv receives (pixel family), the tokens timm's ``patch_drop`` slot keeps (ViT), or the positions
where the first stage's input differs from the plain forward's (mask token: Swin, stem).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masksub import MaskSub
from masksub.train import config as C
from masksub.train.build import build_model


def _capture(module: nn.Module, run, pre: bool) -> list[Tensor]:
    got: list[Tensor] = []
    if pre:
        h = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()))
    else:
        h = module.register_forward_hook(lambda m, a, o: got.append(o.detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        h.remove()
    return got


def hidden_map(cfg: C.Config, x: Tensor) -> tuple[Tensor, str]:
    """(N, 1, H, W) map, 1 where the sub-branch hides the input, and the family's name."""
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).train()
    ms = MaskSub(model, "mask", cfg.ratio, family=cfg.family, **cfg.family_options)
    name = ms.branch.name
    h, w = x.shape[-2:]
    if name == "pixel":
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # after the family's hook
        (seen,) = _capture(first_conv, lambda: ms.forward_sub(x), pre=True)
        cells = (seen == 0).all(1, keepdim=True).float()
        return cells, name
    if name == "vit":
        captured: list[tuple[Tensor, Tensor]] = []

        def grab(m, a, o):
            captured.append((a[0].detach(), (o[0] if isinstance(o, tuple) else o).detach()))

        def run():
            with ms.sub():  # the sub forward's modules are in place now: hook the removal slot
                hd = model.patch_drop.register_forward_hook(grab)
                try:
                    with torch.no_grad():
                        model(x)
                finally:
                    hd.remove()

        run()
        tokens_in, tokens_out = captured[0]
        p = model.num_prefix_tokens
        kept = (tokens_in[:, p:, None, :] == tokens_out[:, None, p:, :]).all(-1).any(-1)  # (N, L)
        g = int(kept.shape[1] ** 0.5)
        cells = (~kept).float().view(-1, 1, g, g)
        return F.interpolate(cells, size=(h, w), mode="nearest"), name
    first = model.layers[0] if hasattr(model, "layers") else model.stages[0]
    (plain,) = _capture(first, lambda: model(x), pre=True)
    (sub,) = _capture(first, lambda: ms.forward_sub(x), pre=True)
    nhwc = plain.shape[-1] != plain.shape[1] and plain.ndim == 4 and name == "swin"
    diff = (plain != sub)
    diff = diff.any(-1) if nhwc else diff.any(1)
    cells = diff.float()[:, None]
    return F.interpolate(cells, size=(h, w), mode="nearest"), name


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, recipes = Path(argv[0]), argv[1:]
    n = 8
    fig, axes = plt.subplots(len(recipes), n, figsize=(n * 1.1, len(recipes) * 1.25), squeeze=False)
    for row, recipe in enumerate(recipes):
        cfg = C.load(recipe, {"subset": 64, "val_subset": 64, "workers": 0})
        x = _images(cfg, n)
        hidden, name = hidden_map(cfg, x)
        share = hidden.mean().item()
        for i in range(n):
            ax = axes[row][i]
            img = x[i, 0].numpy()
            ax.imshow(img, cmap="gray")
            ax.imshow(hidden[i, 0].numpy(), cmap="Reds", alpha=0.55 * hidden[i, 0].numpy(), vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(f"{recipe.removeprefix('fmnist-cpu-')}\n{name}", fontsize=7)
        axes[row][n - 1].set_title(f"{share:.0%} hidden", fontsize=7, loc="right")
        print(f"{recipe}: family {name}, {share:.1%} of the pixels hidden")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


def _images(cfg: C.Config, n: int) -> Tensor:
    """The first ``n`` test images, normalised as the trainer feeds them."""
    from masksub.train.data import build_data

    _, val = build_data(cfg, device=torch.device("cpu"))
    return next(iter(val.plain(n)))[0][:n]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
