"""The package holds what users import or run: no tool reaches up to the ``masksub`` entry point,
and the project's own GPU campaign lives in ``benchmarks/``, outside the package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "masksub"


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg = parts[:-1]  # the package a relative import starts from (for __init__.py: its own)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_no_module_of_the_package_imports_the_cli_dispatcher() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
                 if p != PKG / "cli.py" and "masksub.cli" in _imports(p)]
    assert offenders == []


def test_the_gpu_campaign_is_a_script_outside_the_package() -> None:
    assert (ROOT / "benchmarks" / "gpu_evidence.py").is_file()
    assert sorted(p.name for p in (PKG / "bench").glob("*.py")) == ["__init__.py", "cli.py", "flops.py", "steps.py"]
    assert "benchmarks/gpu_evidence.py" in (ROOT / "benchmarks" / "gpu_evidence.sh").read_text()
