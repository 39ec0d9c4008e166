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


# One fresh interpreter imports torch (every core module needs it, and it loads none of the
# forbidden names: checked below like the rest), then forks a child per core module, which
# imports that module alone and reports what is loaded: a fresh interpreter per module, without
# paying torch's import once per module.
_PROBE = """
import importlib, json, os, sys
import torch
FORBIDDEN, ROOTS = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for module in json.loads(sys.argv[3]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(module)
            bad = sorted(m for m in sys.modules if m.split('.')[0] in ROOTS
                         or any(m == f or m.startswith(f + '.') for f in FORBIDDEN))
        except BaseException as e:
            bad = [f"import failed: {type(e).__name__}: {e}"]
        os.write(w, json.dumps(bad).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    out[module] = json.loads(b"".join(chunks) or b'["no report"]')
print(json.dumps(out))
"""
ROOTS = ["timm", "transformers", "open_clip", "torchvision", "matplotlib", "yaml"]
CONTROLS = ["yaml", "masksub.train.config"]


@pytest.fixture(scope="module")
def loaded_by_core() -> dict[str, list[str]]:
    import json

    probe = [*CORE, *CONTROLS]  # the controls check the probe itself (below)
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(FORBIDDEN), json.dumps(ROOTS), json.dumps(probe)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", CORE)
def test_core_module_loads_nothing_else(module, loaded_by_core):
    assert loaded_by_core[module] == [], f"{module} loaded {loaded_by_core[module]}"


def test_the_probe_sees_a_forbidden_import(loaded_by_core):
    """The check itself: modules that import yaml and the trainer are reported."""
    assert "yaml" in loaded_by_core["yaml"] and "masksub.train" in loaded_by_core["masksub.train.config"]


def test_top_level_is_the_core_only():
    assert {"MaskSub", "sub_branch", "relaxed_loss"} <= set(masksub.__all__)
    assert not set(masksub.__all__) & {"bench", "compare", "train", "integrations", "cli", "inspect"}


def test_tool_subpackages_say_what_they_may_import():
    import masksub.bench
    import masksub.compare
    import masksub.inspect

    for pkg in (masksub.bench, masksub.compare, masksub.inspect):
        assert pkg.__doc__ and "import" in pkg.__doc__, pkg.__name__
