"""How index cost grows with the database: build time, bytes, latency and neighbour recall.

    python experiments/benchmark_index.py [--sizes 100000 1000000] [--queries 200]

The database starts as the real Grocery Store train embeddings (2640, MobileNetV2, from the
embedding cache or computed once); larger sizes add jittered copies of them (each a real
embedding plus Gaussian noise, re-normalised), generated and added in chunks so memory stays at
the index's own size plus one chunk. Queries are real test-photo embeddings. For every size,
exact search (Flat) gives the ground truth and the single-thread baseline; each index is
reported as its single-thread queries/s relative to exact search's, measured in the same
process.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
from hydra import compose, initialize_config_dir

from visual_search import index, metrics, pipeline, timing
from visual_search.config import register_configs
from visual_search.data import load_dataset
from visual_search.embed import build_embedder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHUNK = 50_000
# (name, factory given the size, search settings); nlist ~ 4 sqrt(n), the usual rule.
INDEXES = [
    ("ivf_flat", lambda n: f"IVF{_nlist(n)},Flat", [{"nprobe": p} for p in (4, 8, 16, 32, 64)]),
    ("hnsw", lambda n: "HNSW32", [{"efSearch": e} for e in (16, 32, 64, 128)]),
    ("sq8", lambda n: "SQ8", [{}]),
    ("ivf_sq8", lambda n: f"IVF{_nlist(n)},SQ8", [{"nprobe": p} for p in (8, 32)]),
    ("ivf_pq", lambda n: f"IVF{_nlist(n)},PQ64x8np", [{"nprobe": p} for p in (8, 32)]),
]


def _nlist(n: int) -> int:
    return int(min(4 * np.sqrt(n), n // 39))


def main() -> None:
    args = _parse()
    real, queries = real_embeddings(args.queries)
    print(timing.conditions(), f"real database {len(real)}, queries {len(queries)}")
    print(f"{'size':>9} {'index':>9} {'search':>12} {'build_s':>8} {'MB':>8} {'p50_ms':>8} "
          f"{'qps_1t':>9} {'x_exact':>8} {'nrecall@10':>10}")  # fmt: skip
    for size in [len(real), *args.sizes]:
        skip = set(args.skip_hnsw_above and size > args.skip_hnsw_above and ["hnsw"] or [])
        run_size(real, queries, size, skip, args.latency_queries)


def real_embeddings(n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=grocery_natural", "tracking.enabled=false"])
    images = pipeline.hash_images(load_dataset(cfg.dataset))
    embedder = build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
    crops = pipeline.plan_crops(cfg, images, None)
    embedded = pipeline.embed_crops(cfg, images, crops, embedder)
    rng = np.random.default_rng(0)
    picks = rng.choice(len(embedded.query.vectors), n_queries, replace=False)
    return index.normalise(embedded.database.vectors), index.normalise(
        embedded.query.vectors[picks]
    )


def jittered(real: np.ndarray, start: int, stop: int, sigma: float = 0.02) -> np.ndarray:
    """Rows start..stop of the scaled database: real rows first, then noisy copies of them."""
    rng = np.random.default_rng(start)
    rows = np.arange(start, stop)
    out = real[rows % len(real)].copy()
    noisy = rows >= len(real)
    out[noisy] += rng.normal(0, sigma, size=(int(noisy.sum()), real.shape[1])).astype(np.float32)
    return index.normalise(out)


def run_size(real, queries, size, skip, latency_queries) -> None:
    exact = faiss.IndexFlatIP(real.shape[1])
    for s in range(0, size, CHUNK):
        exact.add(jittered(real, s, min(s + CHUNK, size)))
    exact_scores, exact_ids = exact.search(queries, 10)
    base = timing.single_query_latency(exact, queries, 10, n=latency_queries)
    base_qps = 1000 / base["ms_per_query_p50"]
    _print(size, "flat", "-", 0.0, exact.ntotal * exact.d * 4, base["ms_per_query_p50"],
           base_qps, 1.0, 1.0)  # fmt: skip
    for name, factory, grid in INDEXES:
        if name in skip:
            print(f"{size:>9} {name:>9}  skipped (--skip-hnsw-above)")
            continue
        built, build_s = build(real, size, factory(size))
        nbytes = faiss.serialize_index(built).nbytes
        for params in grid:
            index.set_search_params(built, params)
            _, ids = built.search(queries, 10)
            scores = np.einsum("qd,qkd->qk", queries, _rows(exact, ids))
            recall = metrics.neighbour_recall(ids, exact_ids, exact_scores, scores, k=10)
            lat = timing.single_query_latency(built, queries, 10, n=latency_queries)
            qps = 1000 / lat["ms_per_query_p50"]
            label = ",".join(f"{k}={v}" for k, v in params.items()) or "-"
            _print(size, name, label, build_s, nbytes, lat["ms_per_query_p50"], qps,
                   qps / base_qps, recall)  # fmt: skip
        del built


def build(real: np.ndarray, size: int, factory: str):
    start = time.perf_counter()
    built = faiss.index_factory(real.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not built.is_trained:
        built.train(jittered(real, 0, min(size, 20 * _nlist(size) + len(real), 100_000)))
    for s in range(0, size, CHUNK):
        built.add(jittered(real, s, min(s + CHUNK, size)))
    return built, time.perf_counter() - start


def _rows(exact: faiss.IndexFlatIP, ids: np.ndarray) -> np.ndarray:
    """The stored database vectors behind result ids (zeros for -1 padding)."""
    flat = exact.reconstruct_batch(np.maximum(ids, 0).ravel())
    flat[ids.ravel() < 0] = 0
    return flat.reshape(*ids.shape, exact.d)


def _print(size, name, label, build_s, nbytes, p50, qps, ratio, recall) -> None:
    print(f"{size:>9} {name:>9} {label:>12} {build_s:>8.1f} {nbytes / 1e6:>8.1f} {p50:>8.3f} "
          f"{qps:>9.0f} {ratio:>8.1f} {recall:>10.3f}", flush=True)  # fmt: skip


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--latency-queries", type=int, default=100)
    p.add_argument("--skip-hnsw-above", type=int, default=200_000,
                   help="HNSW's build takes hours at 1M x 1280 on two cores")  # fmt: skip
    return p.parse_args()


if __name__ == "__main__":
    main()
