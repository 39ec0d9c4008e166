"""``masksub inspect``: the report per mode, its warnings, the CLI, and README's family table."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from conftest import tiny_resnet
from torch import nn

from masksub.cli import main as cli_main
from masksub.inspect import inspect_model, load_model


def test_report_per_mode_on_a_resnet():
    reports = {r.mode: r for r in inspect_model(tiny_resnet(drop_rate=0.1), batch=2, repeats=1)}
    mask = reports["mask"]
    assert mask.family == "pixel" and "2 of 4 32x32 px squares zeroed" in mask.does
    assert mask.restored and mask.sub_equals_main is False and 0 < mask.grad_ratio < 100
    assert mask.cost is not None and mask.cost > 0
    assert reports["dropout"].family == "dropout" and "1 dropout rate" in reports["dropout"].does
    assert "empty slot" in reports["droppath"].does  # timm ResNet's drop_path slots hold Identity at rate 0


def test_warns_on_a_gradient_singularity():
    import timm

    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3, depths=(1, 1, 1, 1),
                              dims=(16, 32, 32, 64))
    (rep,) = inspect_model(model, batch=2, repeats=0, modes=("mask",), family="pixel")
    assert any("at init" in w or "not finite" in w for w in rep.warnings), rep.warnings
    (rep,) = inspect_model(model, batch=2, repeats=0, modes=("mask",))
    assert rep.family == "stem" and not rep.warnings


def test_warns_when_the_sub_branch_drops_nothing():
    (rep,) = inspect_model(tiny_resnet(), batch=2, repeats=0, modes=("mask",), mask_fn=lambda m, x, r: x)
    assert rep.sub_equals_main and any("equals the main one" in w for w in rep.warnings)


def test_cli_with_module_function_and_json(capsys):
    code = cli_main(["inspect", "conftest:tiny_resnet", "--modes", "mask", "--batch", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out[0]["family"] == "pixel" and out[0]["restored"] is True and out[0]["cost"] > 0
    assert code == (1 if out[0]["warnings"] else 0)  # exit 1 on a warning
    # on a loaded CPU the measured cost may draw a warning; nothing else may
    assert [w for w in out[0]["warnings"] if "costs" not in w] == []


def test_cli_unknown_model_is_a_clear_error(capsys):
    assert cli_main(["inspect", "resnet_fifty"]) == 2
    assert "timm has no model 'resnet_fifty'" in capsys.readouterr().err


def test_load_model_by_timm_name():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("resnet18", num_classes=3)
    assert isinstance(model, nn.Module) and model.get_classifier().out_features == 3


def test_readme_family_tables_are_the_generators_output():
    import importlib.util

    spec = importlib.util.spec_from_file_location("family_table", Path(__file__).parents[1] / "scripts/family_table.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    from masksub.inspect.table import render, section

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert section(readme) == render(gen.rows()), "run scripts/family_table.py"


def test_cli_builds_the_model_at_img_size_and_passes_family_options(capsys):
    """A 28 px Swin with 4 px regions, as the CPU-evidence recipe trains it: the model is built for
    28 px (a 224 px Swin refuses a 28 px batch) and the region size reaches the family."""
    kw = ["--kw", "in_chans=1", "--kw", "embed_dim=16", "--kw", "depths=[1,1]", "--kw", "num_heads=[1,2]",
          "--kw", "window_size=7"]
    assert cli_main(["inspect", "swin_tiny_patch4_window7_224", "--img-size", "28", *kw, "--modes", "mask",
                     "--option", "region_px=4", "--json"]) == 0
    (rep,) = json.loads(capsys.readouterr().out)
    assert rep["family"] == "swin" and "of 49 regions of 1x1 patch tokens" in rep["does"]
    # a CNN takes no img_size: built as it is, the squares scaled by the option
    assert cli_main(["inspect", "resnet18", "--img-size", "28", "--kw", "in_chans=1", "--modes", "mask",
                     "--option", "patch_size=4", "--json"]) == 0
    (rep,) = json.loads(capsys.readouterr().out)
    assert rep["family"] == "pixel" and "of 49 4x4 px squares zeroed" in rep["does"]
    # --family picks another family; an option it does not take is said in the report, not a traceback
    assert cli_main(["inspect", "resnet18", "--img-size", "28", "--modes", "mask", "--family", "pixel",
                     "--option", "region_px=4", "--json"]) == 0
    (rep,) = json.loads(capsys.readouterr().out)
    assert rep["family"] is None and "region_px" in rep["does"]
