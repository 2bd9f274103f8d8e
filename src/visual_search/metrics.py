"""Retrieval metrics over ranked search results, one chunk of queries at a time.

The protocol every function here follows:

- Relevant: a database item is relevant to a query when their integer labels are equal.
- The query itself: when a query is also in the database, pass its database id as ``exclude``;
  it is removed from the ranking and from the count of relevant items, so it never counts.
- Junk: ids marked junk for a query are removed from its ranking (later items move up) and never
  count as relevant, as in the Oxford/Paris protocol.
- Ties: equal scores follow a stated `TieRule`: pessimistic puts non-relevant items first within a
  tie, optimistic relevant first, expected averages over every order of the tie.
- A query with no relevant item gets AP nan; `summarise` leaves it out of every mean and counts it.

Nothing builds a dense queries x database matrix: each call sees one chunk's ``(nq, k)`` ranked
results, and relevant counts come from label counts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

log = logging.getLogger(__name__)

TieRule = Literal["pessimistic", "optimistic", "expected"]
Interpolation = Literal["step", "trapezoid"]
DEFAULT_KS = (1, 5, 10, 20, 50, 100)


def _matrix(name: str, array, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or (shape is not None and array.shape != shape):
        want = "2-D" if shape is None else f"of shape {shape}"
        raise ValueError(f"{name} must be {want}, got shape {array.shape}")
    return array


def _vector(name: str, array, n: int | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 1 or (n is not None and len(array) != n):
        raise ValueError(f"{name} must be 1-D of length {n or 'n'}, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _tie_starts(scores: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(nq, k) bool, True where a run of equal scores starts; nan and invalid slots stand alone."""
    start = np.ones(scores.shape, dtype=bool)
    start[:, 1:] = scores[:, 1:] != scores[:, :-1]
    if valid is not None:
        start[:, 1:] |= ~valid[:, 1:] | ~valid[:, :-1]
    return start


def order_ties(
    scores: np.ndarray, relevant: np.ndarray, rule: TieRule
) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each row's runs of equal scores by a tie rule; the runs themselves stay in place.

    Args:
        scores: (nq, k) scores in rank order (best first); nan never ties.
        relevant: (nq, k) bool, aligned with ``scores``.
        rule: 'pessimistic' puts non-relevant items first within a tie, 'optimistic' relevant
            first (both stable otherwise); 'expected' returns the input, since `query_metrics`
            then averages over every order of the tie.

    Returns:
        The re-ordered scores and relevant flags.
    """
    scores = _matrix("scores", scores)
    relevant = _matrix("relevant", relevant, scores.shape).astype(bool)
    if rule == "expected":
        return scores, relevant
    if rule not in get_args(TieRule):
        raise ValueError(f"rule must be one of {get_args(TieRule)}, got {rule!r}")
    run = np.cumsum(_tie_starts(scores), axis=1)
    within = relevant if rule == "pessimistic" else ~relevant
    # lexsort sorts by its last key first and is stable, so runs keep their place and order.
    order = np.lexsort((within, run), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(relevant, order, 1)


def _junk_pairs(junk: Sequence, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique (query row, database id) pairs marked junk."""
    if len(junk) != nq:
        raise ValueError(f"junk must hold one collection per query ({nq}), got {len(junk)}")
    cols = [np.asarray(j if j is not None else [], dtype=np.int64).ravel() for j in junk]
    rows = np.repeat(np.arange(nq), [c.size for c in cols])
    pairs = np.unique(np.stack([rows, np.concatenate([np.empty(0, np.int64), *cols])]), axis=1)
    return pairs[0], pairs[1]


def _listed(ids: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(nq, k) bool, True where ids[q, j] is among the cols paired with row q."""
    # One integer per (row, id) pair lets np.isin test the whole chunk at once.
    span = int(max(ids.max(initial=0), cols.max(initial=0))) + 2
    return np.isin(np.arange(len(ids))[:, None] * span + ids + 1, rows * span + cols + 1)


def _kept(ids: np.ndarray, exclude: np.ndarray | None, junk: Sequence | None) -> np.ndarray:
    """(nq, k) bool, False for padding, the query itself and junk."""
    keep = ids >= 0
    if exclude is not None:
        keep &= ids != _vector("exclude", exclude, len(ids))[:, None]
    if junk is not None:
        keep &= ~_listed(ids, *_junk_pairs(junk, len(ids)))
    return keep


def _compact(keep: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Moves each row's kept values up, in rank order, and the removed ones to the end."""
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(values, order, 1)


def rank_relevance(
    ids: np.ndarray,
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    exclude: np.ndarray | None = None,
    junk: Sequence | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Relevance of each ranked result, with padding, the query itself and junk removed.

    Args:
        ids: (nq, k) database ids ranked best first; -1 is no result (FAISS padding).
        query_labels: (nq,) integer label of each query.
        database_labels: (n_db,) integer label of each database item; same label = relevant.
        exclude: (nq,) database id of each query itself, -1 where it is not in the database;
            it is dropped from the ranking, so it counts neither as a result nor as relevant.
        junk: per query, a collection of database ids dropped from the ranking and never relevant.

    Returns:
        ``relevant`` and ``valid``, (nq, k) bool after compaction: removed items drop out, later
        items move up and the freed trailing slots are invalid. Align scores with `compact_scores`.
    """
    ids = _matrix("ids", ids).astype(np.int64)
    query_labels = _vector("query_labels", query_labels, len(ids))
    database_labels = _vector("database_labels", database_labels)
    if ids.size and (ids.min() < -1 or ids.max() >= len(database_labels)):
        bad = f"{ids.min()}..{ids.max()}"
        raise ValueError(f"ids must lie in [-1, {len(database_labels)}), got {bad}")
    keep = _kept(ids, exclude, junk)
    same = database_labels[np.where(keep, ids, 0)] == query_labels[:, None]
    return _compact(keep, keep & same), _compact(keep, keep)


def compact_scores(
    scores: np.ndarray,
    ids: np.ndarray,
    exclude: np.ndarray | None = None,
    junk: Sequence | None = None,
) -> np.ndarray:
    """Scores moved exactly as `rank_relevance` moves results (same arguments); freed slots nan."""
    ids = _matrix("ids", ids).astype(np.int64)
    scores = _matrix("scores", scores, ids.shape)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    keep = _kept(ids, exclude, junk)
    out = _compact(keep, scores)
    out[~_compact(keep, keep)] = np.nan
    return out


def count_relevant(
    query_labels: np.ndarray,
    database_labels: np.ndarray,
    exclude: np.ndarray | None = None,
    junk: Sequence | None = None,
) -> np.ndarray:
    """(nq,) number of relevant database items per query, from label counts (no dense matrix).

    The query itself (``exclude``, -1 = not in the database) and junk ids are not counted, to
    match `rank_relevance` called with the same arguments.
    """
    query_labels = _vector("query_labels", query_labels)
    database_labels = _vector("database_labels", database_labels)
    if min(query_labels.min(initial=0), database_labels.min(initial=0)) < 0:
        raise ValueError("labels must be non-negative integers, got a negative label")
    counts = np.bincount(database_labels, minlength=int(query_labels.max(initial=-1)) + 1)
    n_relevant = counts[query_labels]
    self_id = np.full(len(query_labels), -1, dtype=np.int64)
    if exclude is not None:
        self_id = _vector("exclude", exclude, len(query_labels))
        inside = self_id >= 0
        n_relevant[inside] -= database_labels[self_id[inside]] == query_labels[inside]
    if junk is not None:
        rows, cols = _junk_pairs(junk, len(query_labels))
        if cols.size and (cols.min() < 0 or cols.max() >= len(database_labels)):
            bad = f"{cols.min()}..{cols.max()}"
            raise ValueError(f"junk ids must lie in [0, {len(database_labels)}), got {bad}")
        counted = (cols != self_id[rows]) & (database_labels[cols] == query_labels[rows])
        np.subtract.at(n_relevant, rows[counted], 1)
    return n_relevant


@dataclass
class QueryMetrics:
    """Per-query results for one chunk; `concat` joins chunks.

    Attributes:
        ap: (nq,) average precision, nan for a query with no relevant item.
        hits: k -> (nq,) number of relevant items in the top k (expected value under tie-aware
            scoring, so float).
        any_hit: k -> (nq,) probability that the top k holds a relevant item (0 or 1 unless
            ties='expected').
        n_relevant: (nq,) relevant database items per query.
    """

    ap: np.ndarray
    hits: dict[int, np.ndarray]
    any_hit: dict[int, np.ndarray]
    n_relevant: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[QueryMetrics]) -> QueryMetrics:
        """The chunks' results one after another, in query order."""
        if not parts:
            raise ValueError("concat needs at least one QueryMetrics, got none")

        def join(field: str) -> dict[int, np.ndarray]:
            return {k: np.concatenate([getattr(p, field)[k] for p in parts]) for k in parts[0].hits}

        ap = np.concatenate([p.ap for p in parts])
        n_relevant = np.concatenate([p.n_relevant for p in parts])
        return cls(ap, join("hits"), join("any_hit"), n_relevant)

    def select(self, mask: np.ndarray) -> QueryMetrics:
        """The results of the queries where ``mask`` is True."""
        pick = {k: v[mask] for k, v in self.hits.items()}
        hit = {k: v[mask] for k, v in self.any_hit.items()}
        return QueryMetrics(self.ap[mask], pick, hit, self.n_relevant[mask])


def _ranked_terms(relevant: np.ndarray, interpolation: Interpolation) -> np.ndarray:
    """(nq, k) precision term each relevant item adds to AP for a fixed order."""
    rank = np.arange(1, relevant.shape[1] + 1)
    found = np.cumsum(relevant, axis=1)
    precision = found / rank
    if interpolation == "trapezoid":
        # cnnimageretrieval's rule: average the precision just before and at each relevant item.
        before = np.where(rank == 1, 1.0, (found - 1) / np.maximum(rank - 1, 1))
        precision = (before + precision) / 2
    return np.where(relevant, precision, 0.0)


def _tie_aware_terms(
    scores: np.ndarray, relevant: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Expected relevance and AP term per slot over every order of each tie (McSherry & Najork).

    A tie of n items holding r relevant, after s positions holding R relevant, gives each of its
    ranks i the AP term (r/n) * (R + 1 + (i-s-1)(r-1)/(n-1)) / i and expected relevance r/n.
    """
    nq, width = relevant.shape
    start = _tie_starts(scores, valid).ravel()
    run = np.cumsum(start) - 1  # flat run ids; column 0 always starts a run, so none spans rows
    first = np.flatnonzero(start)[run]
    ties = {
        "n": np.bincount(run)[run],
        "r": np.bincount(run, weights=relevant.ravel())[run],
        "R": (np.cumsum(relevant, axis=1) - relevant).ravel()[first],
        "s": first % max(width, 1),
    }
    rank = np.tile(np.arange(1, width + 1), nq)
    gain = ties["r"] / ties["n"]
    spread = (rank - ties["s"] - 1) * (ties["r"] - 1) / np.maximum(ties["n"] - 1, 1)
    terms = gain * (ties["R"] + 1 + spread) / rank
    return gain.reshape(nq, width), terms.reshape(nq, width), ties


def _any_hit(found: np.ndarray, k: int, ties: dict[str, np.ndarray] | None) -> np.ndarray:
    """(nq,) chance of a relevant item in the top k; exact also where k cuts through a tie."""
    nq, top = len(found), min(k, found.shape[1] - 1)  # top = slots inside the top k
    chance = (found[:, top] > 0).astype(np.float64)
    if ties is None or top == 0:
        return chance
    at = np.arange(nq) * (found.shape[1] - 1) + top - 1  # flat index of the last slot inside
    n, r, s = ties["n"][at], ties["r"][at].astype(np.int64), ties["s"][at]
    # Only a tie cut by k that holds the first relevant items leaves the outcome to chance.
    for q in np.flatnonzero((s + n > top) & (ties["R"][at] == 0) & (r > 0)):
        inside = int(top - s[q])
        chance[q] = 1 - math.comb(int(n[q] - r[q]), inside) / math.comb(int(n[q]), inside)
    return chance


def _check_options(ks: Sequence[int], ties: str, interpolation: str) -> None:
    if ties not in get_args(TieRule):
        raise ValueError(f"ties must be one of {get_args(TieRule)}, got {ties!r}")
    if interpolation not in get_args(Interpolation):
        raise ValueError(f"interpolation must be 'step' or 'trapezoid', got {interpolation!r}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive neighbour counts, got {list(ks)}")
    if ties == "expected" and interpolation == "trapezoid":
        raise ValueError("ties='expected' is defined for interpolation='step', got 'trapezoid'")


def query_metrics(
    scores: np.ndarray,
    relevant: np.ndarray,
    valid: np.ndarray,
    n_relevant: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    ties: TieRule = "pessimistic",
    interpolation: Interpolation = "step",
) -> QueryMetrics:
    """AP and hits@k per query over one chunk of truncated rankings.

    Rankings come from `rank_relevance` and `compact_scores`, so the query itself and junk are
    already gone. AP is non-interpolated ('step'): the mean over all ``n_relevant`` relevant items
    of the precision at each one's rank, where a relevant item missing from the ranking adds 0.
    'trapezoid' averages the precision just before and at each relevant item (the Oxford/Paris
    rule of cnnimageretrieval). Ties follow ``ties`` (see `order_ties`); 'expected' is the
    tie-aware AP of McSherry & Najork (2008), with a tie's r relevant of n counted r/n per slot in
    hits@k. A query with no relevant item gets AP nan.

    NOTE: a tie reaching past the last retrieved slot is scored as if it ended there, since the
    items beyond the truncated ranking are unknown.
    """
    scores = _matrix("scores", scores)
    valid = _matrix("valid", valid, scores.shape).astype(bool)
    relevant = _matrix("relevant", relevant, scores.shape).astype(bool) & valid
    n_relevant = _vector("n_relevant", n_relevant, len(scores))
    _check_options(ks, ties, interpolation)
    if np.any(bad := relevant.sum(axis=1) > n_relevant):
        q = int(np.argmax(bad))
        raise ValueError(
            f"query {q} ranks {relevant[q].sum()} relevant items but n_relevant is "
            f"{n_relevant[q]}; pass count_relevant the same exclude and junk"
        )

    tie_stats = None
    if ties == "expected":
        gain, terms, tie_stats = _tie_aware_terms(scores, relevant, valid)
    else:
        relevant = order_ties(scores, relevant, ties)[1]
        gain, terms = relevant.astype(np.float64), _ranked_terms(relevant, interpolation)

    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(n_relevant > 0, terms.sum(axis=1) / n_relevant, np.nan)
    # A leading zero column makes the top k beyond the ranking (or an empty one) read its end.
    found = np.concatenate([np.zeros((len(gain), 1)), np.cumsum(gain, axis=1)], axis=1)
    hits = {k: found[:, min(k, gain.shape[1])] for k in ks}
    any_hit = {k: _any_hit(found, k, tie_stats) for k in ks}
    return QueryMetrics(ap, hits, any_hit, n_relevant)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _means(per_query: QueryMetrics, ks: Sequence[int]) -> dict[str, float]:
    missing = [k for k in ks if k not in per_query.hits]
    if missing:
        raise ValueError(
            f"ks {missing} were not computed; query_metrics had ks={list(per_query.hits)}"
        )
    has = per_query.n_relevant > 0
    out = {"map": _mean(per_query.ap[has])}
    out |= {f"precision_at_{k}": _mean(per_query.hits[k][has] / k) for k in ks}
    out |= {f"recall_at_{k}": _mean(per_query.any_hit[k][has]) for k in ks}
    n_relevant = per_query.n_relevant[has]
    out |= {f"ir_recall_at_{k}": _mean(per_query.hits[k][has] / n_relevant) for k in ks}
    out |= {"n_queries": len(has), "n_queries_without_relevant": int((~has).sum())}
    return out


def summarise(per_query: QueryMetrics, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Means over the queries that have at least one relevant item.

    Keys: 'map'; 'precision_at_{k}' (mean hits/k, k counted even past the ranking's end);
    'recall_at_{k}' (hit rate, the CBIR meaning: share of queries with a relevant item in the top
    k); 'ir_recall_at_{k}' (mean hits/n_relevant); 'n_queries' (all queries) and
    'n_queries_without_relevant' (left out of every mean).
    """
    out = _means(per_query, ks)
    if out["n_queries_without_relevant"]:
        n_without, n = out["n_queries_without_relevant"], out["n_queries"]
        log.info("%d of %d queries have no relevant item; left out of the means", n_without, n)
    return out


def per_class(
    per_query: QueryMetrics, query_labels: np.ndarray, class_names: Sequence[str]
) -> list[dict]:
    """One row per query class: class, n_queries, map, precision_at_10, recall_at_1.

    Means follow `summarise`; n_queries counts every query of the class.
    """
    query_labels = _vector("query_labels", query_labels, len(per_query.ap))
    rows = []
    for label in np.unique(query_labels):
        means = _means(per_query.select(query_labels == label), (1, 10))
        keys = ("n_queries", "map", "precision_at_10", "recall_at_1")
        rows.append({"class": class_names[label]} | {key: means[key] for key in keys})
    return rows


def neighbour_recall(
    ids: np.ndarray,
    exact_ids: np.ndarray,
    exact_scores: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    k: int = 10,
    atol: float = 1e-5,
) -> float:
    """ANN neighbour recall@k: the share of the exact top k that the approximate top k finds.

    Without scores an approximate result counts when its id is in the exact top k. With scores
    (both similarities, higher is better; negate L2 distances) it counts when its exact score is
    >= the k-th exact score, so a different item tied at the boundary is not penalised. -1 ids
    are padding; a query whose exact top k is empty is skipped.

    Args:
        ids: (nq, >= k) approximate result ids, best first.
        exact_ids: (nq, >= k) exact-search ids, best first.
        exact_scores: (nq, >= k) exact-search scores of ``exact_ids``.
        scores: (nq, >= k) exact scores of ``ids`` (as a Flat-storage index returns them).
        k: number of neighbours.
        atol: scores within this of the k-th exact score count as tied with it: the same inner
            product summed in another order (FAISS's kernel, numpy's) differs in the last bits.
    """
    ids = _matrix("ids", ids)
    exact_ids = _matrix("exact_ids", exact_ids)
    if len(exact_ids) != len(ids) or min(ids.shape[1], exact_ids.shape[1]) < k:
        shapes = f"{ids.shape} and {exact_ids.shape}"
        raise ValueError(f"ids and exact_ids must be (nq, >= k={k}), got {shapes}")
    if (exact_scores is None) != (scores is None):
        raise ValueError("pass both exact_scores and scores for the tie-aware count, or neither")
    ids, exact_ids = ids[:, :k], exact_ids[:, :k]
    n_true = (exact_ids >= 0).sum(axis=1)
    if scores is None:
        rows = np.repeat(np.arange(len(ids)), k)
        found = (ids >= 0) & _listed(ids, rows, exact_ids.ravel())
    else:
        exact_scores = _matrix("exact_scores", exact_scores)[:, :k]
        scores = _matrix("scores", scores)[:, :k]
        kth = exact_scores[np.arange(len(ids)), np.maximum(n_true - 1, 0)]
        found = (ids >= 0) & (scores >= kth[:, None] - atol)
    counted = n_true > 0
    return _mean(np.minimum(found.sum(axis=1), n_true)[counted] / n_true[counted])
