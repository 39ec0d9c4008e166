"""``masksub train --recipe NAME --show``: the resolved recipe beside its published values."""

from __future__ import annotations

from pathlib import Path

import pytest

from masksub.cli import main
from masksub.train import config as C
from masksub.train.show import recipe_lines


def test_show_marks_overrides_and_the_lr_rule(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--recipe", "deit3-vit-b-400", "--show", "--batch-size", "64",
                 "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "batch_size" in out and "CHANGED: published 256 (README --batch-size 256" in out
    assert "README --lr 3.0e-3" in out and "engine.py: targets = targets.gt(0.0)" in out
    assert "NOT the published setting" in out and "1 value(s) differ from the recipe: batch_size" in out
    assert not any(tmp_path.iterdir())  # nothing ran, no run directory
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main(["train", "--recipe", "deit3-vit-b-400", "--show"]) == 0
    out = capsys.readouterr().out
    assert "= 2048" in out and "WARNING" not in out and "0 value(s) differ" in out
    assert main(["train", "--recipe", "mae-ft-vit-b", "--show", "--batch-size", "64"]) == 0
    assert "scaled linearly to 0.001" in capsys.readouterr().out  # 2e-3 x 512 / 1024


@pytest.mark.parametrize("name", ["deit3-vit-s-400", "ftclip-vit-b", "rsb-a2-resnet50", "swin-t"])
def test_show_lists_every_recipe_value(name: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--recipe", name, "--show"]) == 0
    out = capsys.readouterr().out
    lines = recipe_lines(name)
    cfg = C.load(name, check_paths=False)
    for key, (_, src) in lines.items():
        assert f"  {key} " in out, key
        if src:
            assert src in out, (key, src)
    assert len(lines) >= 30 and cfg.recipe == name
