"""MaskSub in an accelerate custom loop under ``accelerate launch`` (2 CPU processes): the
gradients are all-reduced once per step in both orders, and the processes stay identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_accelerate_launch_two_processes_one_all_reduce_per_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "counts.json"
    # --multi_gpu is accelerate's torchrun launcher; the script's Accelerator(cpu=True) makes it a
    # 2-process CPU (gloo) group. "--cpu" on the command line would take the single-process launcher.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(HERE / "accelerate_worker.py"), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    c = json.loads(out.read_text())
    assert c["world"] == 2
    for order in ("memory", "fused"):
        assert c[order]["allreduces"] == 3 and c[order]["same"] and c[order]["loss_sub"] > 0, c
