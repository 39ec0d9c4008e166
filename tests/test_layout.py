"""The package layout: the core needs torch alone and loads no tool, trainer or integration."""

import pkgutil
import subprocess
import sys

import pytest

import masksub
import masksub.branches

CORE = ["masksub", "masksub.errors", "masksub.loss", "masksub.step", "masksub.branches"] + [
    f"masksub.branches.{m.name}" for m in pkgutil.iter_modules(masksub.branches.__path__)
]
# What the core must never pull in: the tools, the trainer, the integrations, and any library
# beyond torch.
FORBIDDEN = ("masksub.bench", "masksub.compare", "masksub.inspect", "masksub.train", "masksub.integrations",
             "masksub.cli", "timm", "transformers", "open_clip", "torchvision", "matplotlib", "yaml")


@pytest.mark.parametrize("module", CORE)
def test_core_module_loads_nothing_else(module):
    code = (f"import sys, {module}; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {{'timm','transformers','open_clip','torchvision','matplotlib','yaml'}} "
            f"or any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r})); print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{module} loaded {res.stdout.strip()} {res.stderr[-2000:]}"


def test_top_level_is_the_core_only():
    assert {"MaskSub", "sub_branch", "relaxed_loss"} <= set(masksub.__all__)
    assert not set(masksub.__all__) & {"bench", "compare", "train", "integrations", "cli", "inspect"}


def test_tool_subpackages_say_what_they_may_import():
    import masksub.bench
    import masksub.compare
    import masksub.inspect

    for pkg in (masksub.bench, masksub.compare, masksub.inspect):
        assert pkg.__doc__ and "import" in pkg.__doc__, pkg.__name__
