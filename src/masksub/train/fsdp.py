"""FSDP2 for ``masksub train --dist fsdp``: sharding, mixed precision, sharded checkpoints.

For models past one GPU's memory: parameters, gradients and optimizer state are sharded over
the ranks (``torch.distributed.fsdp.fully_shard``). The MaskSub step needs nothing special
(``MaskSub`` turns gradient sync off for the first backward, as under DDP); this module
shards the model after MaskSub has added its parameters, evens out the evaluation batches
(every forward is a collective under FSDP) and writes checkpoints through
``torch.distributed.checkpoint``: each rank writes its own shards into a temporary directory,
which is renamed when complete; then the small ``last.pt`` (progress, RNG, config) is replaced
atomically, pointing at it. A reader therefore always sees a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import MaskSubError
from . import checkpoint as ckpt_mod


def check_config(cfg: Any) -> None:
    """What FSDP2 training does not do (yet), refused before any work."""
    if cfg.amp == "fp16":
        raise MaskSubError("dist=fsdp trains in fp32 or bf16 (FSDP2 has no sharded fp16 GradScaler here); "
                           "use --amp bf16")
    if cfg.ema:
        raise MaskSubError("dist=fsdp does not keep an EMA copy (it would be a full, unsharded model on "
                           "every rank); set ema: false or use --dist ddp")


def setup(model: nn.Module, cfg: Any, distributed: bool, device: torch.device) -> Any:
    """Shard ``model`` for the trainer (one process: nothing to shard, checkpoints still
    sharded-format, so eval and export read them in any world size); returns this module."""
    if cfg.fsdp_activation_checkpointing:
        checkpoint_blocks(model)
    if distributed:
        shard_model(model, amp=cfg.amp, device_type=device.type)
    else:
        print("masksub train: dist=fsdp in one process: nothing to shard (launch with torchrun)",
              file=sys.stderr)
    return sys.modules[__name__]


def same_path(path: Path) -> Path:
    """Rank 0's run directory on every rank (a timestamped name may differ by a second)."""
    if not (dist.is_available() and dist.is_initialized()):
        return path
    obj = [str(path)]
    dist.broadcast_object_list(obj, src=0)
    return Path(obj[0])


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one before the root: every member of a ``blocks`` list (timm
    transformers: ViT, DeiT, BEiT, Eva, Swin's ``layers.N.blocks``); none for a model without
    one (ResNet and other CNNs: the whole model is one unit)."""
    units: list[nn.Module] = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(m, (nn.ModuleList, nn.Sequential)):
            units.extend(m.children())
    return units


def mp_policy(amp: str) -> Any:
    """bf16 all-gathers and compute, fp32 gradient reduction; fp32 throughout otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if amp == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, *, amp: str = "none", activation_checkpointing: bool = False,
                device_type: str | None = None) -> nn.Module:
    """``fully_shard`` each block, then the whole model, in place (call after MaskSub and
    before the optimizer: the optimizer must see the sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise MaskSubError("dist=fsdp needs a process group: launch with torchrun --nproc_per_node N")
    if activation_checkpointing:
        checkpoint_blocks(model)
    device_type = device_type or next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = mp_policy(amp)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing through timm's own hook: blocks recomputed in the backward."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise MaskSubError(f"{type(model).__name__} has no set_grad_checkpointing(); set "
                           "fsdp_activation_checkpointing: false")
    model.set_grad_checkpointing(True)


def even(batches: Iterable[Any], pad: Callable[[Tensor], Any], d: Any, device: torch.device,
         probe_shape: tuple[int, ...]) -> Iterator[Any]:
    """Yield this rank's batches, then call ``pad(x)`` until no rank has one left: under FSDP
    each forward all-gathers, so a rank that stopped early would leave the others waiting
    forever (validation shards may differ by one image, a stream's by more). One flag
    all-reduce per batch decides; ``x`` is the last batch's input, or zeros of ``probe_shape``."""
    from . import distributed as D

    it = iter(batches)
    last: Tensor | None = None
    while True:
        batch = next(it, None)
        if not D.any_flag(batch is not None, d, device):
            return
        if batch is None:
            pad(last if last is not None else torch.zeros(probe_shape, device=device))
        else:
            last = batch[0]
            yield batch


# -- checkpoints ------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it "assumes the intent is to save/load in a single process": it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(run_dir: Path, name: str, state: dict[str, Any], model: nn.Module,
         optimizer: torch.optim.Optimizer, main: bool) -> Path | None:
    """Every rank writes its shards (``dcp.save``) into ``.NAME.dcp.tmp``; rank 0 renames it to
    ``NAME-STEP.dcp``, then atomically replaces the pointer file ``NAME`` (``last.pt``) that
    names it, then removes the older directories. A kill at any point leaves the previous
    pointer and the directory it names intact."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    stem = name.removesuffix(".pt")
    tmp = run_dir / f".{stem}.dcp.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a writer killed mid-write
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    _barrier()  # every rank's shards and the metadata are on disk
    if not main:
        return None
    tag = f"{stem}-{state['global_step']:09d}.dcp"
    k = 1
    while (run_dir / tag).exists():  # the same step written twice (epoch end, then a stop)
        k += 1
        tag = f"{stem}-{state['global_step']:09d}-{k}.dcp"
    os.replace(tmp, run_dir / tag)
    ckpt_mod.fsync_dir(run_dir)
    payload = {k2: v for k2, v in state.items() if k2 not in ("model", "optimizer")}
    payload["sharded"] = tag
    path = ckpt_mod.save(run_dir / name, payload)
    for old in run_dir.glob(f"{stem}-*.dcp"):
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)
    return path


def local_view(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with each rank's own shards in place of the sharded tensors (DTensors), for
    checks every rank runs on its part and then agrees on (the non-finite check)."""
    def local(v: Any) -> Any:
        return v.to_local() if hasattr(v, "to_local") else v

    out = dict(state)
    out["model"] = {k: local(v) for k, v in (state.get("model") or {}).items()}
    opt = state.get("optimizer") or {}
    out["optimizer"] = {**opt, "state": {i: {k: local(v) for k, v in st.items()}
                                         for i, st in opt.get("state", {}).items()}}
    return out


def sharded_dir(ck: dict[str, Any], path: str | Path) -> Path:
    """The directory a pointer checkpoint names, next to it; a clear error when it is gone."""
    p = Path(path)
    base = p if p.is_dir() else p.parent
    d = base / ck["sharded"]
    if not (d / ".metadata").is_file():
        raise MaskSubError(f"checkpoint {path} names the sharded state {d}, which is missing or incomplete; "
                           "copy the run directory whole (the .dcp directories belong to last.pt / best.pt)")
    return d


def load(ck: dict[str, Any], path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Resume: each rank reads its shards of the model and optimizer state (DCP reshards:
    eval reads them in one process; a resume keeps the run's world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    d = sharded_dir(ck, path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(d))
    except Exception as e:  # noqa: BLE001 - DCP raises its own CheckpointException
        raise MaskSubError(f"checkpoint {d} cannot be read into this run ({type(e).__name__}: "
                           f"{str(e)[:200]}); resume with the config it was written with") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_weights(ck: dict[str, Any], path: str | Path, model: nn.Module) -> None:
    """The model weights of a sharded checkpoint into a plain, unsharded model (``masksub eval``,
    the weights export): one process reads every shard."""
    import torch.distributed.checkpoint as dcp

    d = sharded_dir(ck, path)
    sd = model.state_dict()
    state = {"model": sd}
    no_dist = not (dist.is_available() and dist.is_initialized())
    with _quiet():
        dcp.load(state, checkpoint_id=str(d), no_dist=no_dist)
    model.load_state_dict(state["model"])

