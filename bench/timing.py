"""Shared timing for the benchmarks: interleaved rounds, medians, and an in-run fp32 mm peak.

Every variant runs once per round, the order alternating between rounds, so slow drift of the
machine (frequency, noisy neighbours) hits all variants alike; medians ignore outliers.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

PEAK_N = 2048  # the fp32 peak is the median speed of a 2048^3 torch.mm, timed in the same rounds
PEAK_KEY = "torch.mm peak probe"


def mm_probe() -> Callable[[], torch.Tensor]:
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    return lambda: a @ b


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> tuple[dict[str, float], float]:
    """Median seconds per call of each variant, and the fp32 mm peak in FLOP/s."""
    variants = {**variants, PEAK_KEY: mm_probe()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + warmup):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for key in order:
            start = time.perf_counter()
            variants[key]()
            if r >= warmup:
                times[key].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    peak = 2 * PEAK_N**3 / medians.pop(PEAK_KEY)
    return medians, peak


def write_json(path: str, results: object) -> None:
    """Write a benchmark's results (creating bench/results/) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
