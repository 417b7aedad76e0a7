"""What the benchmarks share: the machine's measured matmul peak, FLOP counting, timing statistics, reports."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def machine() -> dict:
    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10, device="cpu") -> float:
    """GFLOP/s of a square matmul, the best of `repeats`: the ceiling the models are measured against."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 2):  # two warm-up runs
        started = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (matmuls and convolutions, as torch.utils.flop_counter counts them)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def summary(seconds: list[float]) -> dict:
    """Median and spread of repeated timings."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "runs": len(seconds)}


def write_report(out: Path, name: str, report: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
