"""Write README's family table from ``masksub inspect`` on common models (random init, CPU).

    PYTHONPATH=src python scripts/family_table.py [README.md] [--fresh]

Rows already in the table are kept (a slow CPU can fill it over several runs); ``--fresh``
measures every model again. The README is rewritten after each row. Cost and gradient ratio
are measured on the machine that runs it; tests/test_inspect.py checks the family and
description columns.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from masksub.inspect.table import COMMON, END, START, parse, render, row


def write(readme: Path, rows: list[list[str]]) -> None:
    text = readme.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{render(rows)}\n{END}{tail}")


def main(argv: list[str]) -> None:
    fresh = "--fresh" in argv
    readme = Path(next((a for a in argv if not a.startswith("--")), "README.md"))
    warnings.simplefilter("ignore")
    try:
        have = {} if fresh else parse(readme.read_text())
    except IndexError:
        have = {}
    rows = [have[n] for n in COMMON if n in have]
    for name in COMMON:
        if name in have:
            continue
        torch.manual_seed(0)
        new = row(name)
        rows = sorted([*rows, new], key=lambda r: COMMON.index(r[0].strip("`")))
        write(readme, rows)
        print(" | ".join(new), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
