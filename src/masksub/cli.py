"""``masksub`` entry point. Each sub-command lives in its own module, imported on use, so
``masksub bench`` does not pay for transformers and ``masksub glue`` not for matplotlib."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Each module has add_arguments(parser) and main(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("masksub.train.cli_train", "train a model with a recipe (baseline or MaskSub)"),
    "eval": ("masksub.train.cli_eval", "evaluate a checkpoint on a data set"),
    "compare": ("masksub.compare.cli", "run settings side by side and write a results table and plots"),
    "plot": ("masksub.compare.plot", "plot accuracy, losses and gradient norms of run directories"),
    "bench": ("masksub.bench.cli", "measure MaskSub's step cost against a plain training step"),
    "glue": ("masksub.integrations.glue", "finetune a Hugging Face model on a GLUE task"),
    "clip": ("masksub.integrations.clip_train", "train an open_clip model on image-text files"),
    "inspect": ("masksub.inspect.cli", "show the sub-branch of a model per mode: family, cost, gradient ratio"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masksub", description="MaskSub: masked sub-branch training")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"masksub {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("masksub"):
                raise
            p.set_defaults(_missing=e.name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"masksub {args.command}: not available in this build ({args._missing} missing)", file=sys.stderr)
        return 2
    from .errors import MaskSubError

    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except MaskSubError as e:
        one_line = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"masksub {args.command}: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"masksub {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
