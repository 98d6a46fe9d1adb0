"""Shared timing for the benchmarks: interleaved rounds, medians, and an in-run mm peak.

Every variant runs once per round, the order alternating between rounds, so slow drift of the
machine (frequency, noisy neighbours) hits all variants alike; medians ignore outliers. On CUDA
each call is timed between two synchronisations, and the peak is that of a bf16 mm.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The peak is the median speed of an n^3 torch.mm timed in the same rounds: fp32 2048^3 on CPU,
# bf16 8192^3 on CUDA.
PEAK_N = {"cpu": (2048, torch.float32), "cuda": (8192, torch.bfloat16)}
PEAK_KEY = "torch.mm peak probe"


def mm_probe(device: str = "cpu") -> tuple[Callable[[], torch.Tensor], int]:
    """A matrix product to time, and its FLOPs."""
    n, dtype = PEAK_N[device]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return lambda: a @ b, 2 * n**3


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int, device: str = "cpu"
) -> tuple[dict[str, float], float]:
    """Median seconds per call of each variant, and the mm peak in FLOP/s."""
    probe, probe_flops = mm_probe(device)
    variants = {**variants, PEAK_KEY: probe}
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + warmup):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for key in order:
            sync()
            start = time.perf_counter()
            variants[key]()
            sync()
            if r >= warmup:
                times[key].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    peak = probe_flops / medians.pop(PEAK_KEY)
    return medians, peak


def ratio_table(
    title: str,
    medians: dict[str, float],
    base_key: str,
    mib: tuple[str, str, dict[str, float]] | None = None,
    digits: int = 1,
) -> dict:
    """Print each variant's median ms and its ratio to ``base_key``, and return the rows for the
    JSON; ``mib`` = (column header, JSON key, MiB per variant) adds a memory column."""
    print(f"\n{title}")
    head = f"{'variant':34s} {'ms':>8s} {'vs ' + base_key[:24]:>28s}"
    print(head + (f" {mib[0]:>21s}" if mib else ""))
    rows = {}
    for key, sec in medians.items():
        rows[key] = {"ms": sec * 1e3, "ratio_to_base": sec / medians[base_key]}
        line = f"{key:34s} {sec * 1e3:8.{digits}f} {sec / medians[base_key]:27.2f}x"
        if mib:
            rows[key][mib[1]] = mib[2][key]
            line += f" {mib[2][key]:17.1f} MiB"
        print(line)
    return rows


def write_json(path: str, results: object) -> None:
    """Write a benchmark's results (creating bench/results/) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
