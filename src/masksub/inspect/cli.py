"""``masksub inspect MODEL``: family, sub-branch, cost and gradient ratio of a model, per mode."""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import asdict

from ..branches import MODES
from ..errors import MaskSubError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a timm model name (random init, no download) or module:function")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    parser.add_argument("--ratio", type=float, default=None, help="the sub-branch strength (default: the paper's)")
    parser.add_argument("--img-size", type=int, default=64, help="random input images of this size (default 64)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                        help="model builder keyword (repeatable), e.g. --kw depth=2 --kw drop_rate=0.1")
    parser.add_argument("--family", default=None, help="the family to use instead of the one found (see README)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="family option (repeatable), e.g. --option patch_size=4 for 4 px squares")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _kwargs(items: list[str], flag: str = "--kw") -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MaskSubError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(args: argparse.Namespace) -> int:
    from .report import inspect_model, load_model

    for flag, value in (("--batch", args.batch), ("--img-size", args.img_size), ("--num-classes", args.num_classes)):
        if value < 1:
            raise MaskSubError(f"{flag} must be at least 1, got {value}")
    if not args.model:
        raise MaskSubError("give the MODEL to inspect: a timm model name or module:function")
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise MaskSubError(f"--modes takes {','.join(MODES)}; got {','.join(bad)}")
    kw = _kwargs(args.kw)
    options = _kwargs(args.option, "--option")
    if args.family is not None:
        options["family"] = args.family
    model = load_model(args.model, num_classes=args.num_classes, default_img_size=args.img_size, **kw)
    reports = inspect_model(model, modes=modes, ratio=args.ratio, image_size=args.img_size, batch=args.batch,
                            **options)
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
    else:
        print(f"{args.model} ({type(model).__name__}), {args.batch}x{args.img_size}px random batch, this machine:")
        for r in reports:
            print(r.line())
    return 1 if any(r.warnings for r in reports) else 0
