"""Repeated augmentation (DeiT's ``RASampler``, timm's ``RepeatAugSampler``) as an index order.

Each image of a shuffled epoch appears ``repeats`` times in a row; the rows are dealt to ranks
in turn, so the copies of one image land on different GPUs (each with its own augmentation)
and each rank sees about ``n / world`` samples per epoch. The order depends on (seed, epoch,
rank, world) only, so ``--resume`` restarts it exactly; with seed 0 it equals timm's
``RepeatAugSampler`` (which seeds with the epoch alone).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The one shuffle stream of an epoch (shared with the plain order in ``data.epoch_order``)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def repeated_order(n: int, seed: int, epoch: int, repeats: int, rank: int, world: int,
                   selected_round: int = 256) -> Tensor:
    """This rank's indices for one epoch with each image repeated ``repeats`` times.

    Follows DeiT ``samplers.py`` ``RASampler.__iter__``: randperm, repeat-interleave, pad by
    wrapping to a multiple of ``world``, take every ``world``-th from ``rank``, and keep the
    first ``floor(n // 256 * 256 / world)`` (so an epoch has the length of a plain one).
    """
    if repeats < 2:
        raise ValueError("repeated_order needs repeats >= 2")
    perm = torch.randperm(n, generator=epoch_generator(seed, epoch))
    idx = torch.repeat_interleave(perm, repeats)
    num_samples = math.ceil(n * repeats / world)
    total = num_samples * world
    if selected_round and n >= selected_round:
        selected = n // selected_round * selected_round // world
    else:
        selected = math.ceil(n / world)
    selected = min(selected, num_samples)
    positions = torch.arange(rank, total, world)[:selected]
    return idx[positions % len(idx)]
