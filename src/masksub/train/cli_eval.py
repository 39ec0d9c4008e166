"""``masksub eval``: top-1 / top-5 of a checkpoint on a data set."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a .pt file or a run directory (its last.pt)")
    p.add_argument("--data", help="data set (default: the one it was trained on)")
    p.add_argument("--ema", action="store_true", default=None,
                   help="evaluate the EMA weights (default: those that scored, for a best.pt)")
    p.add_argument("--raw", dest="ema", action="store_false", help="evaluate the raw (non-EMA) weights")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--export", metavar="FILE.pt",
                   help="also write the weights as a plain state dict (torch.load-able; pretrained_file=)")


def evaluate_checkpoint(path: str, *, data: str | None = None, ema: bool | None = None,
                        batch_size: int | None = None, device: str | None = None,
                        sets: list[str] | None = None, export: str | None = None) -> dict:
    import torch

    from ..errors import MaskSubError
    from . import checkpoint
    from . import config as C
    from .build import build_model, label_criterion
    from .data import build_data

    if export:
        check_export_path(export)
    ck = checkpoint.load(path, require=("config", "model"))
    if ema is None:  # a best.pt names the weights that scored best_top1 (raw or EMA)
        ema = ck.get("eval_weights") == "ema"
    # the saved config with this command's overrides, checked once: the data it was trained on may
    # be gone when --data names another copy
    cfg = C.apply(C.Config(), ck["config"], "the saved config")
    ov = C.parse_sets(sets or [])
    if data:
        ov["data"] = data
    if batch_size:
        ov["eval_batch_size"] = batch_size
    if device:
        ov["device"] = device
    C.apply(cfg, ov, "the command line")
    C.validate(cfg)
    from .distributed import check_device

    check_device(cfg.device)
    dev = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(cfg, pretrained=False)  # the checkpoint has every weight
    arch_keys = list(model.state_dict())  # the architecture's own weights, before any sub-branch extra
    sd = ck.get("model")  # None for dist=fsdp: the weights are in the DCP directory it names
    if ema:
        if not ck.get("ema"):
            raise MaskSubError(f"checkpoint {path} has no EMA weights")
        sd = {k.removeprefix("module."): v for k, v in ck["ema"].items()}
    names = sd if sd is not None else {k for k, _ in ck.get("signature", [])}
    if "masksub_mask_token" in names and not hasattr(model, "masksub_mask_token"):
        import masksub

        masksub.prepare(model, "mask", cfg.family, **cfg.family_options)
    checkpoint.check_model(ck, model, cfg.model, path)
    if ck.get("sharded") and not ema:  # dist=fsdp: the weights are in a DCP directory beside it
        from .fsdp import load_weights

        load_weights(ck, path, model)
        sd = model.state_dict()
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise MaskSubError(
            f"checkpoint {path}: {len(bad)} weight tensor(s) are not finite (e.g. {', '.join(bad[:3])}), so "
            "every prediction is meaningless; it was written by a run that diverged. Evaluate an earlier "
            "checkpoint (best.pt) instead")
    model.load_state_dict(sd)
    _, val = build_data(cfg, device=dev, eval_only=True)  # a bad --data fails before the export is written
    if export:
        _export(model, arch_keys, cfg, export)
    model.to(dev).eval()
    crit = label_criterion(cfg)
    n = top1 = top5 = loss = 0.0
    with torch.no_grad():
        for x, y in val.iterate(0, 0):
            logits = model(x).float()
            hit = logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]
            top1 += hit[:, 0].sum().item()
            top5 += hit.any(1).sum().item()
            loss += crit(logits, y).item() * len(y)
            n += len(y)
    n = max(n, 1)
    return {"checkpoint": str(path), "data": cfg.data, "top1": 100 * top1 / n, "top5": 100 * top5 / n,
            "val_loss": loss / n, "count": int(n), "ema": ema}


def check_export_path(export: str) -> None:
    """Refuse, before any work, an export path that is a folder or cannot be written."""
    import os
    from pathlib import Path

    from ..errors import MaskSubError

    p = Path(export).expanduser()
    if p.is_dir():
        raise MaskSubError(f"--export {export} is a directory; give a file name, e.g. {p / 'model.pt'}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MaskSubError(f"--export {export}: {parent} is not a directory, so the file cannot be written there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MaskSubError(f"--export {export}: {parent} is not writable; give a path you can write")


def _export(model, arch_keys: list[str], cfg, export: str) -> None:
    """The architecture's weights alone (no mask token or other sub-branch extra), checked to load
    strictly into a freshly built model of it: the file a user takes to timm elsewhere."""
    from ..errors import MaskSubError
    from . import checkpoint
    from .build import build_model

    sd = model.state_dict()
    plain = build_model(cfg, pretrained=False)
    plain.load_state_dict({k: sd[k] for k in arch_keys}, strict=True)
    try:
        checkpoint.export_weights(plain, export)
    except OSError as e:
        raise MaskSubError(f"--export {export} could not be written ({e.strerror or e}); no partial file "
                           "was left. Give another path") from None


def main(args: argparse.Namespace) -> int:
    r = evaluate_checkpoint(args.checkpoint, data=args.data, ema=args.ema, batch_size=args.batch_size,
                            device=args.device, sets=args.sets, export=args.export)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"masksub eval: {r['checkpoint']} on {r['data']} ({r['count']} images): "
              f"top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, loss {r['val_loss']:.4f}")
    return 0
