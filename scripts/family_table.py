"""Write README's family table from ``masksub inspect`` on common models (random init, CPU).

    PYTHONPATH=src python scripts/family_table.py [README.md]

Cost and gradient ratio are measured on the machine that runs it; the family and description
columns are checked by tests/test_inspect.py.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from masksub.inspect.table import COMMON, END, START, render, row


def main(path: str = "README.md") -> None:
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    rows = []
    for name in COMMON:
        rows.append(row(name))
        print(" | ".join(rows[-1]), flush=True)
    readme = Path(path)
    text = readme.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{render(rows)}\n{END}{tail}")


if __name__ == "__main__":
    main(*sys.argv[1:])
