"""One experiment: dataset -> decode -> embed -> index -> search -> metrics -> tracking.

`run` reads as one call per stage; each stage hands its artifact to the next and owns nothing
beyond it. Everything that can be checked without compute is checked first, in `validate`.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from visual_search import cache, data, embed, index, metrics, tracking, visualise
from visual_search.config import TieRule, unknown_keys
from visual_search.images import DecodeSettings

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is wrong; raised before any compute."""


@dataclass
class Embedded:
    """Embeddings of a dataset's items and what it took to get them."""

    vectors: np.ndarray  # (n_items, d) float32, not normalised; zero rows for unused/skipped
    dataset: data.Dataset  # with skipped items removed from queries and database
    skipped: dict[str, str]  # item id -> reason
    fingerprint: str
    n_computed: int
    seconds: float


@dataclass
class Evaluation:
    per_query: metrics.QueryMetrics
    top_ids: np.ndarray  # (nq, grid_k) database positions, -1 past the end
    top_scores: np.ndarray
    search_s: float


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one experiment, write its outputs into `out_dir`, track it, return its metrics."""
    validate(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = data.load_dataset(cfg.dataset)
    embedder = embed.build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
    embedded = embed_dataset(cfg, dataset, embedder)
    built, build_s = build_index(cfg, embedded)
    evaluation = evaluate(cfg, built, embedded)
    results = summarise(cfg, embedded, evaluation, build_s)
    artifacts = write_outputs(cfg, embedded, evaluation, results, out_dir)
    if cfg.tracking.enabled:
        results["mlflow_run_id"] = tracking.log_run(
            cfg.tracking, OmegaConf.to_container(cfg, resolve=True), _numeric(results), artifacts
        )
    return results


def validate(cfg: DictConfig) -> None:
    """Fail on settings that types alone cannot catch, before any data is read."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"unknown settings {unknown}: check their spelling")
    if OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError("dataset.root is not set; pass dataset.root=DIR (a folder of images)")
    problems = []
    if any(k <= 0 for k in cfg.eval.ks):
        problems.append(f"eval.ks must be positive, got {list(cfg.eval.ks)}")
    if cfg.search.k is not None and cfg.search.k <= 0:
        problems.append(f"search.k must be positive or null (whole database), got {cfg.search.k}")
    if cfg.search.max_pairs_per_chunk <= 0:
        problems.append(
            f"search.max_pairs_per_chunk must be positive, got {cfg.search.max_pairs_per_chunk}"
        )
    workers = cfg.embedder.num_workers
    if cfg.embedder.batch_size <= 0 or (workers is not None and workers < 0):
        problems.append(
            f"embedder.batch_size must be positive and embedder.num_workers >= 0, got "
            f"{cfg.embedder.batch_size} and {workers}"
        )
    background = list(cfg.decode.background)
    if len(background) != 3 or not all(0 <= v <= 255 for v in background):
        problems.append(f"decode.background must be three values in 0..255, got {background}")
    if cfg.decode.max_pixels <= 0:
        problems.append(f"decode.max_pixels must be positive, got {cfg.decode.max_pixels}")
    if problems:
        raise ConfigError("; ".join(problems))


def decode_settings(cfg: DictConfig) -> DecodeSettings:
    return DecodeSettings(tuple(cfg.decode.background), cfg.decode.max_pixels)


def embed_dataset(cfg: DictConfig, dataset: data.Dataset, embedder: embed.Embedder) -> Embedded:
    """Embed every image the dataset uses, re-using any embedding cached for the same bytes."""
    start = time.perf_counter()
    used = dataset.used_items()
    fingerprint, digests = data.fingerprint(dataset.root, [dataset.items[i] for i in used])
    producer = {"embedder": embedder.description, "decode": OmegaConf.to_container(cfg.decode)}
    store = cache.VectorStore(Path(cfg.paths.cache) / "embeddings" / cache.key(producer), producer)

    # Look up the cache first; only the misses reach the model.
    vectors = np.zeros((len(dataset.items), embedder.dim), dtype=np.float32)
    found, cached = store.get(digests)
    if cached is not None:
        vectors[used[found]] = cached
    missing = used[~found]
    log.info(
        "embeddings: %d cached, %d to compute (store %s)",
        found.sum(),
        len(missing),
        store.directory,
    )
    skipped: dict[str, str] = {}
    if len(missing):
        paths = [dataset.root / dataset.items[i] for i in missing]
        computed, bad = embed.embed_files(
            embedder, paths, decode_settings(cfg), cfg.embedder.batch_size, cfg.embedder.num_workers
        )
        ok = np.array([j not in bad for j in range(len(missing))], dtype=bool)
        vectors[missing[ok]] = computed[ok]
        missing_digests = [digests[j] for j in np.flatnonzero(~found)]
        store.put([d for d, keep in zip(missing_digests, ok, strict=True) if keep], computed[ok])
        skipped = {dataset.items[missing[j]]: reason for j, reason in bad.items()}
    if skipped:
        log.warning("%d images skipped (undecodable); see skipped.csv", len(skipped))
        dataset = dataset.without([dataset.items.index(p) for p in skipped])
    seconds = time.perf_counter() - start
    return Embedded(vectors, dataset, skipped, fingerprint, int(len(missing)), seconds)


def build_index(cfg: DictConfig, embedded: Embedded):
    start = time.perf_counter()
    built = index.build(embedded.vectors[embedded.dataset.database], cfg.index.factory)
    return built, time.perf_counter() - start


def evaluate(cfg: DictConfig, built, embedded: Embedded) -> Evaluation:
    """Search every query in chunks and score each chunk, so memory stays at one chunk's worth."""
    ds = embedded.dataset
    query_labels, database_labels = ds.labels[ds.query], ds.labels[ds.database]
    exclude = ds.self_positions()
    n_relevant = metrics.count_relevant(query_labels, database_labels, exclude=exclude)
    k = min(cfg.search.k or len(ds.database), len(ds.database))
    chunk = max(1, cfg.search.max_pairs_per_chunk // max(k, 1))
    grid_k = max(cfg.eval.grid_k, 10)

    parts, tops, top_scores, search_s = [], [], [], 0.0
    for s in range(0, len(ds.query), chunk):
        e = min(s + chunk, len(ds.query))
        t = time.perf_counter()
        scores, ids = index.search(built, embedded.vectors[ds.query[s:e]], k, exclude[s:e])
        search_s += time.perf_counter() - t
        relevant, valid = metrics.rank_relevance(ids, query_labels[s:e], database_labels)
        parts.append(
            metrics.query_metrics(
                scores,
                relevant,
                valid,
                n_relevant[s:e],
                tuple(cfg.eval.ks),
                TieRule(cfg.eval.ties).value,
            )
        )
        tops.append(_pad(ids[:, :grid_k], grid_k, -1))
        top_scores.append(_pad(scores[:, :grid_k], grid_k, np.nan))
    return Evaluation(
        metrics.QueryMetrics.concat(parts),
        np.concatenate(tops),
        np.concatenate(top_scores),
        search_s,
    )


def _pad(a: np.ndarray, width: int, fill) -> np.ndarray:
    out = np.full((a.shape[0], width), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def summarise(cfg: DictConfig, embedded: Embedded, evaluation: Evaluation, build_s: float) -> dict:
    results = metrics.summarise(evaluation.per_query, tuple(cfg.eval.ks))
    results.update(
        n_database=len(embedded.dataset.database),
        n_skipped=len(embedded.skipped),
        n_embedded=embedded.n_computed,
        embed_s=round(embedded.seconds, 3),
        index_build_s=round(build_s, 4),
        search_s=round(evaluation.search_s, 4),
        dataset_fingerprint=embedded.fingerprint,
    )
    return results


def write_outputs(cfg, embedded: Embedded, evaluation: Evaluation, results: dict, out_dir: Path):
    """Write the run directory: resolved config, metrics, per-query and per-class tables,
    skipped files and the retrieval grid. Returns the files to track."""
    ds = embedded.dataset
    paths = {
        "config": out_dir / "config.yaml",
        "metrics": out_dir / "metrics.json",
        "per_query": out_dir / "per_query.csv",
        "per_class": out_dir / "per_class.csv",
        "skipped": out_dir / "skipped.csv",
        "grid": out_dir / "retrieval_grid.png",
    }
    cache.write_atomic(paths["config"], OmegaConf.to_yaml(cfg, resolve=True).encode())
    cache.write_json(paths["metrics"], results)
    _write_per_query(paths["per_query"], cfg, ds, evaluation)
    query_labels = ds.labels[ds.query]
    _write_rows(
        paths["per_class"], metrics.per_class(evaluation.per_query, query_labels, ds.class_names)
    )
    _write_rows(
        paths["skipped"],
        [{"id": k, "reason": v} for k, v in embedded.skipped.items()],
        ["id", "reason"],
    )
    _write_grid(paths["grid"], cfg, ds, evaluation)
    return list(paths.values())


def _write_per_query(path: Path, cfg, ds: data.Dataset, evaluation: Evaluation) -> None:
    pq = evaluation.per_query
    rows = []
    for i, q in enumerate(ds.query):
        row = {
            "id": ds.items[q],
            "label": ds.class_names[ds.labels[q]],
            "n_relevant": int(pq.n_relevant[i]),
        }
        row["ap"] = round(float(pq.ap[i]), 6)
        row.update({f"hits_at_{k}": round(float(pq.hits[k][i]), 4) for k in cfg.eval.ks})
        row["top_ids"] = " ".join(ds.items[ds.database[j]] for j in evaluation.top_ids[i] if j >= 0)
        rows.append(row)
    _write_rows(path, rows)


def _write_rows(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or (list(rows[0]) if rows else [])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_grid(path: Path, cfg, ds: data.Dataset, evaluation: Evaluation) -> None:
    """A few queries, drawn with a fixed seed, with their top results."""
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.eval.grid_queries, len(ds.query))
    picks = np.sort(rng.choice(len(ds.query), size=n, replace=False))
    results, relevant, scores = [], [], []
    for i in picks:
        ids = [j for j in evaluation.top_ids[i][: cfg.eval.grid_k] if j >= 0]
        results.append([ds.root / ds.items[ds.database[j]] for j in ids])
        relevant.append([ds.labels[ds.database[j]] == ds.labels[ds.query[i]] for j in ids])
        scores.append([float(s) for s in evaluation.top_scores[i][: len(ids)]])
    queries = [ds.root / ds.items[ds.query[i]] for i in picks]
    visualise.retrieval_grid(queries, results, relevant, scores, path)


def _numeric(results: dict) -> dict[str, float]:
    return {
        k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
