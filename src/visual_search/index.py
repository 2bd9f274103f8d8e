"""FAISS indexes over L2-normalised embeddings, built from factory strings, and their search.

Every index uses the inner-product metric on unit-norm rows, so scores are cosine similarities.
Building and searching are separate calls: a sweep builds once and searches with many settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import faiss
import numpy as np

from visual_search import cache

log = logging.getLogger(__name__)


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows; the one normalisation every path (database, query, Grad-CAM) uses.

    Args:
        x: (n, d) or (d,) array of any float dtype and memory layout.

    Returns:
        (n, d) float32 C-contiguous array with unit-norm rows; all-zero rows stay zero.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny))


def build(
    database: np.ndarray, factory: str = "Flat", build_params: dict[str, int] | None = None
) -> faiss.Index:
    """Build an inner-product index on the database from a FAISS factory string.

    Args:
        database: (n, d) embeddings; normalised here, whatever their dtype or layout.
        factory: a FAISS index factory string, e.g. ``Flat``.
        build_params: settings the string cannot carry, e.g. ``{"efConstruction": 80}``.
    """
    xb = normalise(database)
    validate(factory, xb.shape[1], len(xb))
    try:
        index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"index.factory={factory!r} is not a valid FAISS factory string") from err
    set_build_params(index, build_params or {})
    if not index.is_trained:
        index.train(xb)
    index.add(xb)
    log.info("built %s index: %d vectors of dimension %d", factory, index.ntotal, index.d)
    return index


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database neighbours of each query, by cosine similarity.

    Args:
        index: built by `build`.
        queries: (nq, d) embeddings; normalised here.
        k: neighbours wanted; more than the database holds gives the whole database.
        exclude: (nq,) database id to leave out of each query's results (the query itself when
            queries are part of the database), -1 for none.

    Returns:
        scores (nq, k') float32 and ids (nq, k') int64, best first, k' = min(k, available).
        FAISS pads short result lists with -1: the columns no query filled are cut, and a row
        shorter than the widest keeps -1 ids (and -inf scores) at its end, so a -1 is never
        read as a database id. Exact indexes fill every row.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    xq = normalise(queries)
    if xq.shape[1] != index.d:
        raise ValueError(f"queries have dimension {xq.shape[1]}, the index {index.d}")
    if exclude is not None and np.shape(exclude) != (len(xq),):
        raise ValueError(
            f"exclude must have one id per query ({len(xq)}), got shape {np.shape(exclude)}"
        )
    extra = 1 if exclude is not None else 0
    depth = min(k + extra, index.ntotal)
    scores, ids = index.search(xq, depth)
    if exclude is not None:
        scores, ids = _drop(scores, ids, ids == np.asarray(exclude)[:, None])
    # Approximate indexes can return fewer than `depth` hits (-1 ids) for some queries; keep the
    # columns every query filled and leave the rest to the caller as -1 at the end of a row.
    scores, ids = _drop(scores, ids, ids < 0)
    width = min(k, int((ids >= 0).sum(axis=1).max(initial=0)))
    return scores[:, :width], ids[:, :width]


def _drop(scores: np.ndarray, ids: np.ndarray, mask: np.ndarray):
    """Move masked entries to the end of each row (order kept) and mark them -1 / -inf."""
    order = np.argsort(mask, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    moved = np.take_along_axis(mask, order, axis=1)
    return np.where(moved, -np.inf, scores).astype(np.float32), np.where(moved, -1, ids)


# Keys of FAISS's own parameters inside a factory string, and the config keys that set them.
_IVF = re.compile(r"IVF(\d+)")
_PQ = re.compile(r"(?<![O])PQ(\d+)(?:x(\d+))?")
_OPQ = re.compile(r"OPQ(\d+)")
_HNSW = re.compile(r"HNSW(\d+)")
_NSG = re.compile(r"NSG(\d+)")
_PCA = re.compile(r"PCA[RW]*(\d+)")
MAX_PQ_NBITS = 16
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training vectors per k-means centroid


def validate(factory: str, d: int, n_train: int) -> list[str]:
    """Check a factory string against the data before any training.

    Args:
        factory: FAISS index factory string.
        d: embedding dimension.
        n_train: number of vectors the index will be trained on (the database).

    Returns:
        Warnings (already logged), e.g. too few training vectors per inverted list.

    Raises:
        ValueError: a setting that FAISS would reject or crash on, naming the config key.
    """
    warnings = []
    if "IDMap" in factory:
        raise ValueError(f"index.factory={factory!r}: IDMap is not supported; the index numbers "
                         "the database rows itself")  # fmt: skip
    for pattern, what, least in ((_HNSW, "HNSW links per node (M)", 2), (_NSG, "NSG degree", 1),
                                 (_IVF, "nlist", 1), (_PQ, "M", 1), (_OPQ, "M", 1)):  # fmt: skip
        for match in pattern.finditer(factory):
            if int(match.group(1)) < least:
                raise ValueError(f"{what} must be >= {least}, got {match.group(1)} "
                                 f"(index.factory={factory!r})")  # fmt: skip
    for match in _PCA.finditer(factory):
        out = int(match.group(1))
        if not 1 <= out <= min(d, n_train):
            raise ValueError(
                f"PCA to {out} dimensions needs 1 <= {out} <= min(dimension {d}, training "
                f"vectors {n_train}) (index.factory={factory!r})"
            )
    for match in _IVF.finditer(factory):
        nlist = int(match.group(1))
        if nlist > n_train:
            raise ValueError(
                f"nlist={nlist} needs at least {nlist} training vectors, got {n_train}; "
                f"lower index.nlist (index.factory={factory!r})"
            )
        if n_train < MIN_POINTS_PER_LIST * nlist:
            warnings.append(
                f"nlist={nlist} with {n_train} training vectors leaves "
                f"{n_train / nlist:.1f} per list, under the {MIN_POINTS_PER_LIST} FAISS asks for; "
                f"lists will be poorly trained, consider index.nlist <= "
                f"{max(1, n_train // MIN_POINTS_PER_LIST)}"
            )
    for pattern, name in ((_PQ, "M"), (_OPQ, "M")):
        for match in pattern.finditer(factory):
            m = int(match.group(1))
            if d % m:
                divisors = [i for i in range(1, d + 1) if d % i == 0]
                raise ValueError(
                    f"{name}={m} must divide the dimension {d}; values that do: {divisors}; "
                    f"set index.{name} (index.factory={factory!r})"
                )
    for match in _PQ.finditer(factory):
        nbits = int(match.group(2) or 8)
        if not 1 <= nbits <= MAX_PQ_NBITS:
            raise ValueError(f"PQ nbits must be in 1..{MAX_PQ_NBITS}, got {nbits}; set "
                             f"index.nbits (index.factory={factory!r})")  # fmt: skip
        if n_train < 2**nbits:
            raise ValueError(
                f"PQ with nbits={nbits} needs at least {2**nbits} training vectors, got {n_train}; "
                f"lower index.nbits (index.factory={factory!r})"
            )
    try:
        faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1][:200]
        raise ValueError(
            f"index.factory={factory!r} is not a valid FAISS factory string for an inner-product "
            f"index of dimension {d} ({first})"
        ) from err
    for warning in warnings:
        log.warning(warning)
    return warnings


def set_build_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply build-time settings the factory string cannot carry (HNSW's efConstruction)."""
    if params.get("efConstruction"):
        hnsw = _find_hnsw(index)
        if hnsw is None:
            raise ValueError("index.efConstruction is set but the index has no HNSW graph")
        hnsw.efConstruction = int(params["efConstruction"])


def _find_hnsw(index: faiss.Index):
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _find_hnsw(index.index)
    return getattr(index, "hnsw", None)


def set_search_params(index: faiss.Index, params: dict[str, int | float]) -> None:
    """Apply search-time settings (``nprobe``, ``efSearch``, ...) to a built index."""
    if not params:
        return
    text = ",".join(f"{k}={v}" for k, v in params.items())
    try:
        faiss.ParameterSpace().set_index_parameters(index, text)
    except RuntimeError as err:
        raise ValueError(f"index.search_grid: {text} does not apply to this index") from err


def build_cached(
    database: np.ndarray,
    factory: str,
    cache_dir: Path,
    build_params: dict[str, int] | None = None,
) -> tuple[faiss.Index, Path, float, bool]:
    """Build an index, or load the one built before from the same vectors and settings.

    Returns:
        the index, its file in the cache, the seconds its build took (measured when it was
        built, also when it now comes from the cache: a sidecar JSON file keeps them), and
        whether it came from the cache.
    """
    xb = normalise(database)
    build_params = {k: v for k, v in (build_params or {}).items() if v is not None}
    digest = hashlib.sha256(xb.tobytes()).hexdigest()
    path = cache_dir / "indexes" / f"{cache.key([digest, factory, build_params])}.faiss"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        return faiss.read_index(str(path)), path, json.loads(sidecar.read_text())["build_s"], True
    start = time.perf_counter()
    index = build(xb, factory, build_params)
    seconds = time.perf_counter() - start
    cache.write_atomic(path, faiss.serialize_index(index).tobytes())
    cache.write_json(sidecar, {"build_s": seconds, "factory": factory, "params": build_params})
    return index, path, seconds, False
