"""Write README's family tables: every registered family, and every model module the sweep
(tests/test_family_sweep.py) checks with the family it gets.

    PYTHONPATH=src python scripts/family_table.py [README.md]

tests/test_inspect.py checks README holds exactly this output; the sweep checks each family.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from family_sweep import HF_FAMILY, HF_IMAGE, HF_TEXT, TIMM, UNBUILDABLE  # noqa: E402

from masksub.inspect.table import render, section  # noqa: E402


def rows() -> list[tuple[str, str, str]]:
    out = [(f"timm `{m}`", name, family) for m, (name, _, family) in sorted(TIMM.items())]
    out += [(f"timm `{m}`", "-", f"not built: {why}") for m, why in sorted(UNBUILDABLE.items())]
    out += [(f"Hugging Face `{k}`", f"{k} classification head", HF_FAMILY[k]) for k in HF_IMAGE + HF_TEXT]
    return out


def main(argv: list[str]) -> None:
    readme = Path(argv[0]) if argv else ROOT / "README.md"
    text = readme.read_text()
    readme.write_text(text.replace(section(text), render(rows())))


if __name__ == "__main__":
    main(sys.argv[1:])
