"""Peak dense bf16 FLOP/s of the accelerators MFU is reported against.

Model FLOPs utilisation (PaLM, appendix B) divides the FLOPs a step needs
(:mod:`moe_lab.accounting`) by its time and by the hardware's peak. The peaks are the vendors'
dense (not 2:4 sparse) bf16 tensor-core figures: NVIDIA's H100/H200 datasheets (SXM 989.4
TFLOP/s, NVL 835, PCIe 756), A100 312, L40S 362, L4 121, B200 2250. A device not listed here has
no MFU unless ``train.peak_flops`` names its peak (also the way to get an MFU on CPU).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["BF16_PEAK_FLOPS", "peak_flops"]

log = logging.getLogger(__name__)

# Matched in order against torch.cuda.get_device_name(): the variants before their family.
BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835e12),
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """The peak FLOP/s of one ``device``: ``override`` when given, else the table's bf16 figure
    for a listed CUDA device, else None (no MFU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_FLOPS:
        if key in name:
            return peak
    log.warning("no bf16 peak known for %r: set train.peak_flops to report MFU", name)
    return None
