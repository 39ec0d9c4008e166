"""``masksub clip``: train an open_clip model on image-text files, baseline or MaskSub.

Data (``--data``, and optionally ``--val-data``): a CSV/TSV with a header naming an image
column (``filepath``, ``image``, ``path`` or ``--img-key``) and a caption column (``title``,
``caption``, ``text`` or ``--caption-key``), image paths relative to the file; or a folder of
``NAME.jpg|png|...`` + ``NAME.txt`` pairs. Model: an open_clip name (``ViT-B-32``) or a JSON
model config file (``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``); weights from
``--pretrained`` (an open_clip tag or a local file) or random. Writes ``OUT/log.jsonl`` and
``OUT/checkpoint.pt`` (every epoch and at ``--max-steps``; ``--resume`` continues from it exactly,
mid-epoch included). The checkpoint has open_clip_train's layout (``state_dict`` + trainer state),
so ``--pretrained OUT/checkpoint.pt`` and ``open_clip.create_model(name, pretrained=...)`` load it.
Under ``torchrun`` each process trains its share of the data in DDP; the contrastive loss is
``open_clip.ClipLoss`` with the features of every rank gathered, as open_clip_train does.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import MaskSubError
from ..step import ORDERS, resolve_amp_dtype
from .files import check_utf8

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
IMG_KEYS = ("filepath", "image", "path", "image_path", "file")
CAPTION_KEYS = ("title", "caption", "text", "captions")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="CSV/TSV of image path + caption, or a folder of image + .txt pairs")
    p.add_argument("--val-data", default=None, help="same format; reports image<->text retrieval top-1")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name or a JSON model config file")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint (default: random init)")
    p.add_argument("--sub", default="mask", choices=["none", "mask"], help="none: plain CLIP; mask: MaskSub")
    p.add_argument("--ratio", type=float, default=None, help="image token removal ratio of the sub-branch (0.5)")
    p.add_argument("--text", default="shared", choices=["shared", "detached"],
                   help="sub-branch text features: shared with the main graph (default) or detached")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after N optimizer steps, checkpointed; --resume continues exactly (0: all epochs)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (each its own contrastive batch, one all-reduce)")
    p.add_argument("--order", default="memory", choices=ORDERS,
                   help="memory: main backward first, lower peak memory; fused: one backward; same gradient")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.2)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps before cosine decay")
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="fp16 adds a GradScaler")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--img-key", default=None)
    p.add_argument("--caption-key", default=None)
    p.add_argument("--out", default="runs/clip")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def read_pairs(source: str, img_key: str | None = None, caption_key: str | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a CSV/TSV file or a folder of image + .txt pairs."""
    src = Path(source)
    if src.is_dir():
        pairs = []
        for img in sorted(src.iterdir()):
            txt = img.with_suffix(".txt")
            if img.suffix.lower() in IMAGE_SUFFIXES and txt.is_file():
                check_utf8(txt)
                pairs.append((img, txt.read_text(encoding="utf-8").strip()))
        if not pairs:
            raise MaskSubError(f"{source} holds no image + .txt pairs (NAME.jpg with NAME.txt)")
        return pairs
    if not src.is_file():
        raise MaskSubError(f"--data {source} is neither a file nor a folder")
    check_utf8(src)
    with open(src, newline="", encoding="utf-8") as f:
        sample = f.read(4096)
        f.seek(0)
        delim = "\t" if src.suffix == ".tsv" or sample.count("\t") > sample.count(",") else ","
        reader = csv.DictReader(f, delimiter=delim)
        cols = reader.fieldnames or []
        ik = img_key or next((k for k in IMG_KEYS if k in cols), None)
        ck = caption_key or next((k for k in CAPTION_KEYS if k in cols), None)
        if ik not in cols or ck not in cols:
            raise MaskSubError(
                f"{source}: need an image column ({'/'.join(IMG_KEYS)}) and a caption column "
                f"({'/'.join(CAPTION_KEYS)}), or --img-key/--caption-key; the header is {cols}"
            )
        pairs = []
        for row in reader:
            if not row.get(ck) or not row.get(ik):
                what = "caption" if row.get(ik) else "image path"
                raise MaskSubError(f"{source}, line {reader.line_num}: no {what} (column {ck if row.get(ik) else ik!r}); "
                                   "every row needs an image path and a caption")
            pairs.append((src.parent / row[ik], row[ck]))
    missing = [str(p) for p, _ in pairs if not p.is_file()]
    if missing:
        raise MaskSubError(f"{len(missing)} image(s) listed in {source} do not exist, e.g. {missing[0]}")
    if not pairs:
        raise MaskSubError(f"{source} lists no image-text pairs")
    return pairs


class PairDataset(torch.utils.data.Dataset):
    """Image-text pairs. With a ``seed``, each sample's random augmentation is drawn from its own
    generator, seeded by (seed, epoch, index): the same in every run, whatever the worker count
    and wherever a resumed run starts, and the process's own random stream (the sub-branch's
    masks) is left untouched."""

    def __init__(self, pairs: list[tuple[Path, str]], transform: Any, tokenizer: Any,
                 seed: int | None = None) -> None:
        self.pairs, self.transform, self.tokenizer, self.seed = pairs, transform, tokenizer, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path, caption = self.pairs[i]
        with Image.open(path) as im:
            if self.seed is None:
                image = self.transform(im.convert("RGB"))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
                    image = self.transform(im.convert("RGB"))
        return image, self.tokenizer([caption])[0]


def model_name(spec: str) -> str:
    """An open_clip name; a JSON config file is registered under its stem first."""
    import open_clip

    p = Path(spec)
    if p.suffix == ".json":
        if not p.is_file():
            raise MaskSubError(f"model config {spec} does not exist")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise MaskSubError(f"model config {spec} is not valid JSON: {e}") from e
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise MaskSubError(f"model config {spec} needs embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(p)
        return p.stem
    if spec not in open_clip.list_models():
        raise MaskSubError(f"unknown open_clip model {spec!r}; give a name from open_clip.list_models() or a .json config")
    return spec


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, embeddings-like 1-d params, logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def retrieval_top1(model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    """Image->text and text->image top-1 over the whole evaluation set."""
    model.eval()
    imgs, txts = [], []
    for images, texts in loader:
        imgs.append(model.encode_image(images.to(device), normalize=True).float())
        txts.append(model.encode_text(texts.to(device), normalize=True).float())
    model.train()
    sim = torch.cat(imgs) @ torch.cat(txts).T
    target = torch.arange(sim.shape[0], device=sim.device)
    return {"i2t_top1": float((sim.argmax(1) == target).float().mean()),
            "t2i_top1": float((sim.argmax(0) == target).float().mean())}


class EpochSampler(torch.utils.data.Sampler[int]):
    """This rank's share of one epoch's permutation (seeded by seed and epoch, so a resumed run
    draws the same order), from sample ``start`` on: a resume continues mid-epoch exactly."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _mine(self) -> list[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        # every rank the same number of pairs (the last n % world dropped, as open_clip_train drops
        # the uneven tail): each rank's batches, the last one included, have the same size, which
        # the all-gather of the contrastive loss needs
        return perm[: self.n - self.n % self.world][self.rank::self.world].tolist()

    def __iter__(self):
        return iter(self._mine()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._mine()) - self.start)


def main(args: argparse.Namespace) -> int:
    import open_clip
    from torch.nn.parallel import DistributedDataParallel

    from ..train import distributed
    from .clip import ClipMaskSub, clamp_logit_scale

    out = Path(args.out)
    name = model_name(args.model)
    train_pairs = read_pairs(args.data, args.img_key, args.caption_key)
    val_pairs = read_pairs(args.val_data, args.img_key, args.caption_key) if args.val_data else None
    if args.batch_size < 2 or len(train_pairs) < 2:
        raise MaskSubError("contrastive training needs at least 2 pairs per batch")
    if args.grad_accum < 1:
        raise MaskSubError(f"--grad-accum must be >= 1, got {args.grad_accum}")
    ckpt_path = out / "checkpoint.pt"
    if args.resume and not ckpt_path.is_file():
        raise MaskSubError(f"--resume: no checkpoint at {ckpt_path}")
    d, device = distributed.setup(args.device or "auto")
    finished = False
    try:
        rc = _train(args, out, name, train_pairs, val_pairs, ckpt_path, d, device, open_clip,
                    DistributedDataParallel, ClipMaskSub, clamp_logit_scale)
        finished = True
        return rc
    finally:
        distributed.teardown(finished)


def _train(args: argparse.Namespace, out: Path, name: str, train_pairs: list, val_pairs: list | None,
           ckpt_path: Path, d: Any, device: torch.device, open_clip: Any, DDP: Any, ClipMaskSub: Any,
           clamp_logit_scale: Any) -> int:

    torch.manual_seed(args.seed)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=args.pretrained, device=device)
    tokenizer = open_clip.get_tokenizer(name)
    amp = resolve_amp_dtype(args.precision)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    # open_clip's own loss; under torchrun it gathers the features of every rank (open_clip_train's default)
    loss = open_clip.ClipLoss(rank=d.rank, world_size=d.world)
    net = DDP(model, find_unused_parameters=args.text == "detached") if d.enabled else model
    ms = ClipMaskSub(net, mode=args.sub, ratio=args.ratio, text=args.text, amp_dtype=amp, loss=loss,
                     order=args.order)
    sampler = EpochSampler(len(train_pairs), args.seed, d.rank, d.world)
    per_rank = len(train_pairs) // d.world
    drop_last = per_rank >= 2 * args.batch_size
    train_set = PairDataset(train_pairs, preprocess_train, tokenizer, seed=args.seed)
    # its own generator: creating an iterator (each epoch, each resume) draws nothing from the
    # process's random stream, which a checkpoint saves and a resume restores
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, drop_last=drop_last, num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed))
    val_loader = None if val_pairs is None else torch.utils.data.DataLoader(
        PairDataset(val_pairs, preprocess_val, tokenizer), batch_size=args.batch_size, num_workers=args.workers)
    opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    batches = per_rank // args.batch_size if drop_last else math.ceil(per_rank / args.batch_size)
    steps_per_epoch = max(1, batches // args.grad_accum)
    total = steps_per_epoch * args.epochs  # the schedule; --max-steps only stops early (resumable)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, total - args.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    step = 0
    if args.resume:
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        rng = state.get("rng")
        if rng is not None and len(rng) == d.world:
            torch.set_rng_state(rng[d.rank].cpu())

    def save(epoch_done: int, step: int) -> None:
        rngs = [torch.get_rng_state()]
        if d.enabled:
            rngs = [torch.empty_like(rngs[0]) for _ in range(d.world)]
            torch.distributed.all_gather_object(rngs, torch.get_rng_state())
        if d.main:  # open_clip_train's layout: open_clip.create_model(pretrained=this file) loads it
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "epoch": epoch_done, "step": step, "name": name,
                        "rng": rngs, **({"scaler": scaler.state_dict()} if scaler is not None else {})}, tmp)
            tmp.replace(ckpt_path)

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        stop_signal.append(signum)
        if d.main:
            print(f"\nmasksub clip: {signal.Signals(signum).name}: finishing this step, then writing a checkpoint",
                  file=sys.stderr, flush=True)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _loop(args, out, d, device, model, net, ms, opt, sched, scaler, sampler, train_set, train_loader,
                     val_loader, steps_per_epoch, total, per_rank, step, save, stop_signal, clamp_logit_scale)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _loop(args: argparse.Namespace, out: Path, d: Any, device: torch.device, model: Any, net: Any, ms: Any,
          opt: Any, sched: Any, scaler: Any, sampler: Any, train_set: Any, train_loader: Any, val_loader: Any,
          steps_per_epoch: int, total: int, per_rank: int, step: int, save: Any, stop_signal: list[int],
          clamp_logit_scale: Any) -> int:
    from ..train import distributed

    log = open(out / "log.jsonl", "a") if d.main else None
    net.train()
    t0 = time.perf_counter()
    stop = args.max_steps or total
    while step < min(stop, total):
        epoch, done = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, done * args.grad_accum * args.batch_size)
        train_set.epoch = epoch
        sums = torch.zeros(3, device=device)
        micro = []
        signalled = False
        for images, texts in train_loader:
            micro.append((images, texts))
            if len(micro) < args.grad_accum:
                continue
            for i, (images, texts) in enumerate(micro):
                o = ms.backward(images.to(device, non_blocking=True), texts.to(device, non_blocking=True),
                                scaler=scaler, sync=i == len(micro) - 1, loss_scale=1.0 / len(micro))
                sums += torch.stack([o.loss_main, o.loss_sub if o.loss_sub is not None else o.loss_main * 0,
                                     o.loss_main.new_ones(())]) / len(micro)
            micro = []
            if scaler is not None:
                scaler.unscale_(opt)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            clamp_logit_scale(model)
            step += 1
            signalled = distributed.any_flag(bool(stop_signal), d, device)
            if signalled or step >= stop or step % steps_per_epoch == 0:
                break
        if float(sums[2]) == 0:
            raise MaskSubError(f"an epoch gave no full optimizer step: {per_rank} pairs per process, batch "
                               f"{args.batch_size} x --grad-accum {args.grad_accum}")
        sums = distributed.all_sum(sums, d)
        n = max(float(sums[2]), 1.0)
        epoch_done = step // steps_per_epoch
        rec: dict[str, Any] = {"epoch": epoch_done if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 4),
                               "step": step, "seconds": round(time.perf_counter() - t0, 1),
                               "loss_main": float(sums[0]) / n, "lr": sched.get_last_lr()[0], "world_size": d.world}
        if args.sub == "mask":
            rec["loss_sub"] = float(sums[1]) / n
        if val_loader is not None and d.main:
            rec.update(retrieval_top1(model, val_loader, device))
        save(epoch_done, step)
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if signalled:
            if log is not None:
                log.close()
            sig = stop_signal[0] if stop_signal else signal.SIGTERM
            if d.main:
                print(f"masksub clip: stopped by {signal.Signals(sig).name} at step {step}; checkpoint written; "
                      f"continue with --resume --out {out}", file=sys.stderr, flush=True)
            return 128 + int(sig)  # the shell's convention: 143 TERM, 130 INT
        if step >= stop:
            break
    if log is not None:
        log.close()
    return 0
