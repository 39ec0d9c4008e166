"""Random masks with an exact masked count per row, made on the input's device (no host sync)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def masked_count(n: int, ratio: float) -> int:
    """Round half up, so 15% of 10 tokens masks 2 and 50% of 49 regions masks 25."""
    return int(math.floor(ratio * n + 0.5))


def random_mask(batch: int, n: int, ratio: float, device: torch.device | str | None = None,
                count: int | None = None) -> Tensor:
    """(batch, n) bool, True where masked, exactly ``count`` (default ``masked_count(n, ratio)``) per row."""
    k = masked_count(n, ratio) if count is None else count
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    if k:
        idx = torch.rand(batch, n, device=device).topk(k, dim=1, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def random_mask_among(eligible: Tensor, ratio: float, min_count: int = 0) -> Tensor:
    """Mask ``round(ratio * eligible_count)`` (at least ``min_count`` where a row has that many)
    of the eligible positions of each row, no others."""
    counts = eligible.sum(dim=1)
    k = torch.floor(counts.to(torch.float32) * ratio + 0.5).to(counts.dtype)
    if min_count:
        k = torch.maximum(k, counts.clamp(max=min_count))
    scores = torch.rand(eligible.shape, device=eligible.device)
    scores = scores.masked_fill(~eligible, 2.0)  # ineligible rank last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < k.unsqueeze(1)


def block_mask(batch: int, grid: tuple[int, int], ratio: float, device: torch.device | str | None = None,
               min_block: int = 16, aspect: float = 0.3) -> Tensor:
    """BEiT-style block-wise mask on a token grid: random rectangles until the target count.

    Drawn on the CPU image by image as BEiT's own generator does; the result moves to ``device``.
    """
    h, w = grid
    target = masked_count(h * w, ratio)
    out = torch.zeros(batch, h, w, dtype=torch.bool)
    log_lo, log_hi = math.log(aspect), math.log(1 / aspect)
    for b in range(batch):
        m = out[b]
        count, tries = 0, 0
        while count < target and tries < 1000:
            tries += 1
            left = target - count
            area = float(torch.empty(()).uniform_(min(min_block, left), max(min(min_block, left), left)))
            ar = math.exp(float(torch.empty(()).uniform_(log_lo, log_hi)))
            bh = max(1, min(h, int(round(math.sqrt(area * ar)))))
            bw = max(1, min(w, int(round(math.sqrt(area / ar)))))
            top = int(torch.randint(0, h - bh + 1, ()))
            lft = int(torch.randint(0, w - bw + 1, ()))
            patch = m[top:top + bh, lft:lft + bw]
            new = int((~patch).sum())
            if 0 < new <= left:
                patch.fill_(True)
                count += new
        if count < target:  # top up with single tokens so the count is exact
            free = (~m).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel())[: target - count]]
            m.view(-1)[pick] = True
    return out.flatten(1).to(device)
