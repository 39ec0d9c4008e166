"""FLOPs counted, not assumed: torch's own ``FlopCounterMode``, and peak FLOP/s by GPU name.

The counter sees matmuls, convolutions and attention (the work that scales); element-wise
work such as a pixel mask is free to it, so a zero-pixel sub-branch counts as 1.0x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets, no sparsity). Longer keys first:
# the first key found in ``torch.cuda.get_device_name()`` wins.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "GH200": 989.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    "H800": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s for a GPU name, or None when the name is not in the table."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` runs (forward, and backward if it calls one)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops_per_step: float, step_ms: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak; None without a peak."""
    if not peak or not flops_per_step or not step_ms or step_ms <= 0:
        return None
    return flops_per_step / (step_ms / 1e3) / (peak * 1e12)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-{torch.get_num_threads()}threads"
