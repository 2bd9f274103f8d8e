"""Search latency and throughput, recorded with the conditions they were measured under."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def conditions() -> dict[str, Any]:
    """What a timing depends on besides the code: CPU, cores and library versions."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "faiss": faiss.__version__}


def single_query_latency(
    index: faiss.Index, queries: np.ndarray, k: int, n: int = 200, warmup: int = 10
) -> dict[str, float]:
    """Milliseconds per query, one query at a time on one thread, warm-up excluded.

    Args:
        queries: (nq, d) float32 unit-norm rows; the first `warmup` then `n` are timed in turn
            (cycling when there are fewer).
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        picks = np.resize(np.arange(len(queries)), warmup + n)
        times = []
        for j, i in enumerate(picks):
            start = time.perf_counter()
            index.search(queries[i : i + 1], k)
            if j >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    finally:
        faiss.omp_set_num_threads(previous)
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    return {
        "ms_per_query_p50": float(p50),
        "ms_per_query_p95": float(p95),
        "ms_per_query_p99": float(p99),
        "latency_queries": n,
        "latency_threads": 1,
    }


def batch_throughput(index: faiss.Index, queries: np.ndarray, k: int) -> dict[str, float]:
    """Queries per second for all queries in one call, on every thread FAISS has."""
    index.search(queries[: min(len(queries), 16)], k)  # warm-up
    start = time.perf_counter()
    index.search(queries, k)
    seconds = time.perf_counter() - start
    return {
        "batch_qps": len(queries) / seconds,
        "batch_size": len(queries),
        "batch_threads": faiss.omp_get_max_threads(),
    }
