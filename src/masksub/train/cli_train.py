"""``masksub train``: a recipe, optional overrides, and off it goes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MaskSubError

# flag -> config key; every other key through --set key=value
FLAGS = {
    "data": str, "sub": str, "ratio": float, "order": str, "model": str, "epochs": int,
    "batch_size": int, "lr": float, "seed": int, "output": str, "run_name": str, "amp": str,
    "device": str, "accum_steps": int, "max_steps": int, "threads": int, "workers": int, "dist": str,
    "dropsub_p": float, "pathsub_delta": float,
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
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a run directory that already holds a run (deletes that run)")


# What a checkpoint's weights, optimizer state and data position depend on: fixed on --resume.
FROZEN_ON_RESUME = ("model", "model_kwargs", "num_classes", "img_size", "in_chans", "sub", "family",
                    "family_options", "masking_only", "opt", "layer_decay", "ema", "bce", "data", "data_dir",
                    "train_split", "subset", "subset_seed", "synthetic_size", "batch_size", "accum_steps", "seed", "repeated_aug",
                    "output", "run_name")


def check_resume(saved: dict, cfg, recipe: str | None, where: str) -> None:
    """Refuse, before anything is written, what a resumed run cannot honour."""
    if recipe and Path(recipe).stem != (saved.get("recipe") or ""):
        raise MaskSubError(
            f"--resume {where} continues that run with its own recipe ({saved.get('recipe')!r}); --recipe "
            f"{recipe} would be ignored. Drop --recipe, or start a new run with it")
    new = cfg.to_dict()
    changed = [k for k in FROZEN_ON_RESUME if k in saved and new.get(k) != saved[k]]
    if changed:
        k = changed[0]
        raise MaskSubError(
            f"{', '.join(changed)} cannot change on --resume ({k}: the checkpoint has {saved[k]!r}, the command "
            f"line gives {new[k]!r}); its weights, optimizer state and data position depend on it. Drop the "
            "override, or start a new run (another --run-name) from the weights with pretrained_file=")


def check_strength_flags(ov: dict, sub: str) -> None:
    """``--sub dropout --ratio 0.3`` would silently run p 0.2: ratio is the mask ratio only."""
    key = {"dropout": "dropsub_p", "droppath": "pathsub_delta"}.get(sub)
    if key and "ratio" in ov:
        raise MaskSubError(f"ratio is the mask ratio (sub=mask); sub={sub} takes its strength from {key}: "
                           f"give --{key.replace('_', '-')} {ov['ratio']} instead of --ratio")


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

        saved = checkpoint.load(args.resume, require=("config", "model"))["config"]
        # max_steps limits the invocation that set it, not the run: a resume trains to the last
        # epoch unless given --max-steps again
        cfg = C.from_dict({**saved, "max_steps": 0})
        cfg = C.apply(cfg, ov, "the command line")
        C.validate(cfg)
        check_resume(saved, cfg, args.recipe, args.resume)
    else:
        if not args.recipe:
            raise MaskSubError("give --recipe NAME (see `masksub train --list`) or --resume RUN_DIR")
        cfg = C.load(args.recipe, ov, check_paths=not args.show)
    check_strength_flags(ov, cfg.sub)
    if args.show:
        from .show import render

        print(render(cfg, args.recipe))
        return 0
    from .engine import TrainingStopped, train

    try:
        summary = train(cfg, resume=args.resume, overwrite=getattr(args, "overwrite", False))
    except TrainingStopped as e:
        e.report()
        return 3
    if summary.get("stopped") == "signal":
        return 128 + int(summary.get("signal") or 15)  # the shell's convention: 143 TERM, 130 INT
    return 0
