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


class StepOwningAccelerator:
    """accelerate's Accelerator as MaskSub sees it under DeepSpeed: its ``backward`` also steps the
    engine's optimizer (accelerate's DeepSpeedEngineWrapper.backward), counted here."""

    def __init__(self, engine: str) -> None:
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType[engine]
        self.backwards = 0

    def backward(self, loss) -> None:
        loss.backward()
        self.backwards += 1


@pytest.mark.parametrize("engine", ["DEEPSPEED", "MEGATRON_LM"])
def test_memory_order_is_refused_where_accelerator_backward_steps(engine):
    """Two backward calls would step the optimizer twice per batch: refused before any backward;
    the fused order makes its one call; under plain DDP/CPU the memory order keeps its two."""
    import torch
    from torch.nn import functional as F

    from masksub import MaskSub, MaskSubError

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    half = {"mask_fn": lambda m, x, r: x * 0.5}
    acc = StepOwningAccelerator(engine)
    with pytest.raises(MaskSubError, match=f"order='memory'.*{engine}.*order='fused'"):
        MaskSub(model, "mask", 0.5, order="memory", **half).backward(x, y, F.cross_entropy, backward_fn=acc.backward)
    assert acc.backwards == 0 and all(p.grad is None for p in model.parameters())
    MaskSub(model, "mask", 0.5, order="fused", **half).backward(x, y, F.cross_entropy, backward_fn=acc.backward)
    assert acc.backwards == 1
    plain = StepOwningAccelerator("MULTI_CPU")
    MaskSub(model, "mask", 0.5, order="memory", **half).backward(x, y, F.cross_entropy, backward_fn=plain.backward)
    assert plain.backwards == 2
