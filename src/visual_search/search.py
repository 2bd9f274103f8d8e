"""Ranking every query against the database in chunks, and scoring each chunk.

An image may stand for several embedding rows (one per crop, with the `all` ROI policy). A
query image is then scored against a database image by the best pair of their crops, the way
product search matches the best region. With one row per image this reduces to a plain search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from visual_search import index, metrics
from visual_search.data import Dataset


@dataclass
class Rows:
    """Embedding rows of one side of a search, grouped by image in the side's order.

    Attributes:
        vectors: (n_rows, d) float32 embeddings, not normalised.
        owner: (n_rows,) position of each row's image in that side (query or database list).
        boxes: crop box of each row, None for the whole image.
    """

    vectors: np.ndarray
    owner: np.ndarray
    boxes: list

    @property
    def one_per_image(self) -> bool:
        return bool(np.array_equal(self.owner, np.arange(len(self.owner))))

    def starts(self, n_images: int) -> np.ndarray:
        """(n_images + 1,) offsets: rows of image i are starts[i]:starts[i+1]."""
        return np.searchsorted(self.owner, np.arange(n_images + 1))


@dataclass
class Evaluation:
    per_query: metrics.QueryMetrics
    top_ids: np.ndarray  # (nq, width) database positions, best first, -1 past the end
    top_scores: np.ndarray  # (nq, width) cosine similarities, NaN past the end
    search_s: float


def evaluate(
    built,
    queries: Rows,
    database: Rows,
    dataset: Dataset,
    k: int | None,
    ks: tuple[int, ...],
    ties: str,
    max_pairs: int,
    keep: int = 10,
) -> Evaluation:
    """Search every query and score the rankings, one chunk of queries at a time.

    Args:
        built: index over `database.vectors`, row for row.
        k: ranking depth in database images; None ranks the whole database.
        max_pairs: scores held at once (queries in a chunk x database rows), bounding memory.
        keep: how many top results per query to return for inspection.
    """
    n_db = len(dataset.database)
    query_labels, database_labels = dataset.labels[dataset.query], dataset.labels[dataset.database]
    exclude = dataset.self_positions()
    n_relevant = metrics.count_relevant(query_labels, database_labels, exclude=exclude)
    k = min(k or n_db, n_db)
    plain = queries.one_per_image and database.one_per_image
    chunk = max(1, max_pairs // max(k if plain else len(database.owner), 1))
    q_starts = queries.starts(len(dataset.query))

    parts, top_ids, top_scores, search_s = [], [], [], 0.0
    for s in range(0, len(dataset.query), chunk):
        e = min(s + chunk, len(dataset.query))
        t = time.perf_counter()
        if plain:
            scores, ids = index.search(built, queries.vectors[s:e], k, exclude[s:e])
        else:
            rows = slice(q_starts[s], q_starts[e])
            scores, ids = best_crop_search(
                built, queries.vectors[rows], queries.owner[rows] - s, database, n_db, k,
                exclude[s:e],
            )  # fmt: skip
        search_s += time.perf_counter() - t
        relevant, valid = metrics.rank_relevance(ids, query_labels[s:e], database_labels)
        parts.append(metrics.query_metrics(scores, relevant, valid, n_relevant[s:e], ks, ties))
        top_ids.append(_pad(ids[:, :keep], keep, -1))
        top_scores.append(_pad(scores[:, :keep], keep, np.nan))
    return Evaluation(
        metrics.QueryMetrics.concat(parts),
        np.concatenate(top_ids),
        np.concatenate(top_scores),
        search_s,
    )


def best_crop_search(
    built,
    query_vectors: np.ndarray,
    query_owner: np.ndarray,
    database: Rows,
    n_db: int,
    k: int,
    exclude: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank database images for query images that may each have several rows.

    A database image's score for a query image is the maximum over all pairs of their rows.
    Searching ``k x (most rows of one database image)`` rows deep is enough: an image ranked
    j-th by its best row has at most (j - 1) x m better rows ahead of it.

    Returns:
        scores and ids, (n_query_images, k'): database positions best first, -1 / -inf where a
        query has fewer than k' results.
    """
    n_q = int(query_owner.max()) + 1 if len(query_owner) else 0
    most = int(np.bincount(database.owner).max()) if len(database.owner) else 1
    depth = min(len(database.owner), k * most)
    raw_scores, raw_ids = index.search(built, query_vectors, depth)

    best = np.full((n_q, n_db), -np.inf, dtype=np.float32)
    valid = raw_ids >= 0
    rows = np.broadcast_to(query_owner[:, None], raw_ids.shape)[valid]
    np.maximum.at(best, (rows, database.owner[raw_ids[valid]]), raw_scores[valid])
    has_self = exclude >= 0
    best[np.flatnonzero(has_self), exclude[has_self]] = -np.inf

    order = np.argsort(-best, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(best, order, axis=1)
    ids = np.where(np.isfinite(scores), order, -1)
    width = int(np.isfinite(scores).sum(axis=1).max(initial=0))
    return scores[:, :width], ids[:, :width]


def _pad(a: np.ndarray, width: int, fill) -> np.ndarray:
    out = np.full((a.shape[0], width), fill, dtype=a.dtype)
    out[:, : min(width, a.shape[1])] = a[:, :width]
    return out
