"""Tiny real models (timm, Hugging Face) built from config: no downloads, CPU, milliseconds; and
the helpers of the tests that start processes (process groups, signals), safe when the suite
runs on several cores at once (pytest-xdist): no fixed port, every file under the test's tmp."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

NUM_CLASSES = 5


def tiny_vit(**kw):
    import timm

    args = dict(pretrained=False, depth=1, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args)


def tiny_beit(**kw):
    import timm

    args = dict(pretrained=False, depth=1, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES, img_size=64)
    args.update(kw)
    return timm.create_model("beitv2_base_patch16_224", **args)


def tiny_swin(**kw):
    import timm

    args = dict(pretrained=False, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), embed_dim=16,
                img_size=64, window_size=2, num_classes=NUM_CLASSES)
    args.update(kw)
    return timm.create_model("swin_tiny_patch4_window7_224", **args)


def tiny_resnet(**kw):
    import timm

    args = dict(pretrained=False, num_classes=NUM_CLASSES, layers=[1, 1, 1, 1], channels=[8, 8, 16, 16])
    args.update(kw)
    return timm.create_model("resnet18", **args)


def tiny_bert(**kw):
    from transformers import BertConfig, BertForSequenceClassification

    args = dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, num_labels=3, max_position_embeddings=64)
    args.update(kw)
    return BertForSequenceClassification(BertConfig(**args))


def assert_fails_before_forward(model, call, match):
    """``call()`` raises MaskSubError(match) before ``model`` has run a single forward."""
    from masksub import MaskSubError

    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(MaskSubError, match=match):
            call()
    finally:
        handle.remove()
    assert calls == [], "the model ran a forward before the error"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- running on several cores (pytest-xdist, configured in pyproject.toml) ----------------------
# Each test module runs whole on one worker (``--dist loadfile``: a module fixture such as a
# training run, a process group or a bench runs once). Workers take modules in collection order,
# so the longest modules go first and the last minutes are not one long module running while the
# other cores idle. Rough seconds of each long module in one process on a shared 2-core machine:
# only their order matters, and a module missing here just keeps its place after them.
MODULE_SECONDS = {
    "test_gpu_evidence.py": 340, "test_readme_integrations.py": 340, "test_hf_trainer.py": 220,
    "test_fsdp_train.py": 170, "test_integrations_ddp.py": 115, "test_fsdp.py": 110,
    "test_families_timm.py": 100, "test_reliability.py": 80, "test_readme.py": 75, "test_ddp.py": 60,
    "test_glue.py": 60, "test_clip_train.py": 50, "test_bench.py": 45, "test_signals.py": 36,
    "test_checkpoint.py": 35, "test_sampler.py": 35, "test_torchrun.py": 30,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first (stable: the order within a module is kept)."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for a process that must listen on one; a process
    group is better started through ``spawn_ranks``, which needs no port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable[[int, str, str], None], world: int, tmp: Path) -> list[Any]:
    """Run ``worker(rank, init_method, out_dir)`` in ``world`` fresh processes and return what each
    rank saved with ``torch.save(..., out_dir/f"rank{rank}.pt")``. The ranks meet through a file in
    ``tmp`` (``init_method="file://..."`` for ``dist.init_process_group``): no port to clash with
    another test running at the same time. A rank that raises fails the caller."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp.mkdir(parents=True, exist_ok=True)
    rendezvous = tmp / "rendezvous"
    mp.spawn(_rank_entry, args=(worker, f"file://{rendezvous}", str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def _rank_entry(rank: int, worker: Callable[[int, str, str], None], init_method: str, out: str) -> None:
    """One rank of ``spawn_ranks``: the worker, then an exit that skips interpreter teardown (what
    it saved is on disk; a gloo group still referenced there can abort a finished process)."""
    worker(rank, init_method, out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def signal_when(cmd: list[str], ready: Callable[[], bool], sig: int, *, env: dict[str, str] | None = None,
                group: bool = False, wait_s: float = 120.0, timeout: float = 300.0) -> tuple[int, str, str]:
    """Start ``cmd``, wait until ``ready()`` (at most ``wait_s``, or until it ends by itself), send
    it ``sig`` (``group``: to its whole process group, as a scheduler does to torchrun and its
    workers), and wait for it to end. Returns (exit code, stdout, stderr); never leaves it running."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        if proc.poll() is None:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


def lines_at_least(path: Path, n: int) -> Callable[[], bool]:
    """``ready`` for ``signal_when``: the file (e.g. a run's metrics.jsonl) has ``n`` lines."""
    def ready() -> bool:
        try:
            return len(path.read_text().splitlines()) >= n
        except OSError:
            return False
    return ready
