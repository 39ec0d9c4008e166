"""``masksub train``: a recipe, optional overrides, and off it goes."""

from __future__ import annotations

import argparse
import sys

from ..errors import MaskSubError

# flag -> config key; every other key through --set key=value
FLAGS = {
    "data": str, "sub": str, "ratio": float, "order": str, "model": str, "epochs": int,
    "batch_size": int, "lr": float, "seed": int, "output": str, "run_name": str, "amp": str,
    "device": str, "accum_steps": int, "max_steps": int, "threads": int, "workers": int,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe name (see --list) or a YAML file")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--list-keys", action="store_true", help="list every config key with its default")
    p.add_argument("--show", action="store_true",
                   help="print the resolved recipe beside its published values and sources, then exit")
    for flag, typ in FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=f"o_{flag}", type=typ, default=None,
                       metavar=flag.upper(), help=f"override {flag}")
    p.add_argument("--masking-only", dest="o_masking_only", action="store_const", const=True,
                   default=None, help="Eq. (2): the single branch trained on masked input")
    p.add_argument("--analysis", dest="o_analysis", action="store_const", const=True, default=None,
                   help="log masked/unmasked train loss and per-branch grad norms per epoch")
    p.add_argument("--compile", dest="o_compile", action="store_const", const=True, default=None)
    p.add_argument("--channels-last", dest="o_channels_last", action="store_const", const=True, default=None)
    p.add_argument("--no-progress", dest="o_progress", action="store_const", const=False, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable); dotted keys for dicts: model_kwargs.depth=2")
    p.add_argument("--resume", metavar="RUN_DIR_OR_CKPT",
                   help="continue a run exactly (its saved config; --set / flags still override)")


def overrides(args: argparse.Namespace) -> dict:
    from .config import parse_sets

    out = {k[2:]: v for k, v in vars(args).items() if k.startswith("o_") and v is not None}
    out.update(parse_sets(args.sets))
    return out


def main(args: argparse.Namespace) -> int:
    from . import config as C

    if args.list:
        for name in C.recipe_names():
            print(name)
        return 0
    if args.list_keys:
        for k, v in C.Config().to_dict().items():
            print(f"{k}: {v!r}")
        return 0
    ov = overrides(args)
    if args.resume:
        from . import checkpoint

        saved = checkpoint.load(args.resume)["config"]
        cfg = C.from_dict(saved)
        cfg = C.apply(cfg, ov, "the command line")
        C.validate(cfg)
    else:
        if not args.recipe:
            raise MaskSubError("give --recipe NAME (see `masksub train --list`) or --resume RUN_DIR")
        cfg = C.load(args.recipe, ov, check_paths=not args.show)
    if args.show:
        from .show import render

        print(render(cfg, args.recipe))
        return 0
    from .engine import TrainingStopped, train

    try:
        summary = train(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"masksub train: stopped: {e}", file=sys.stderr)
        return 3
    if summary.get("stopped") == "signal":
        return 128 + int(summary.get("signal") or 15)  # the shell's convention: 143 TERM, 130 INT
    return 0
