"""One experiment: dataset -> decode -> [roi] -> embed -> index -> search -> metrics -> tracking.

`run` reads as one call per stage; each stage hands its artifact to the next and owns nothing
beyond it. Everything that can be checked without compute is checked first, in `validate`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from visual_search import (
    cache,
    data,
    embed,
    index,
    metrics,
    outputs,
    roi,
    runtime,
    stats,
    timing,
    tracking,
)
from visual_search.config import RoiPolicy, RoiSide, TieRule, unknown_keys
from visual_search.images import DecodeSettings
from visual_search.search import Evaluation, Rows, evaluate

log = logging.getLogger(__name__)


CACHE_EVERY = 512  # embeddings computed between two cache writes


class ConfigError(ValueError):
    """A setting is wrong; raised before any compute."""


class NothingToSearch(ValueError):
    """Every query or every database image was skipped; skipped.csv says why."""


@dataclass
class Images:
    """The dataset's images and their content hashes."""

    dataset: data.Dataset  # without the files that could not be read
    digests: dict[int, str]  # item index -> sha256 of the file's bytes
    fingerprint: str
    skipped: dict[str, str] = field(default_factory=dict)  # item id -> why it was left out


@dataclass
class Crops:
    """What each side of the search embeds: per image, a list of crop boxes ([] = whole)."""

    query: list[list]
    database: list[list]
    detections: dict[int, roi.Detections | None] = field(default_factory=dict)
    fallback: dict[int, bool] = field(default_factory=dict)  # cropped-side items with no box
    detected: int = 0  # images the detector ran on in this run
    detect_s: float = 0.0


@dataclass
class Embedded:
    """Embedding rows for both sides, for the dataset with undecodable images removed."""

    dataset: data.Dataset
    query: Rows
    database: Rows
    skipped: dict[str, str]  # item id -> reason
    n_computed: int
    seconds: float


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one experiment, write its outputs into `out_dir`, track it, return its metrics.

    With an index search grid, the returned dict holds the build-level metrics and, under
    `search_grid`, one entry per search setting (its params and metrics); otherwise the one
    setting's metrics are merged in.
    """
    start = time.perf_counter()
    validate(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = data.load_dataset(cfg.dataset)
    try:
        embedder = embed.build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
    except embed.WeightsError:
        raise
    except ValueError as err:  # an unknown library or architecture, a bad thread count
        raise ConfigError(str(err)) from err
    validate_index(cfg, embedder.dim, len(dataset.database))
    images = hash_images(dataset)
    detector = build_detector(cfg)
    crops = plan_crops(cfg, images, detector)
    embedded = embed_crops(cfg, images, crops, embedder)
    ensure_something_to_search(embedded, out_dir)
    built, build = build_index(cfg, embedded.database)
    points = search_each_setting(cfg, built, embedded)
    results = summarise(cfg, images, crops, embedded, build)
    results.update(runtime_conditions(cfg, embedder, detector))
    if detector is not None:
        results.update(compare_with_whole_images(cfg, images, embedded, points[0], embedder))
    results["total_s"] = round(time.perf_counter() - start, 3)
    if crops.detect_s:
        results["detect_share"] = round(crops.detect_s / results["total_s"], 4)
    if len(points) == 1:
        results.update(points[0].metrics)
    else:
        results["search_grid"] = [{**p.params, **p.metrics} for p in points]
    artifacts = outputs.write(cfg, embedded, crops, points[0].evaluation, results, out_dir)
    if cfg.tracking.enabled:
        results["mlflow_run_id"] = tracking.log_run(
            cfg.tracking,
            OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            results,
            artifacts + [build["path"]],
            children=[(p.params, {**results, **p.metrics}) for p in points]
            if len(points) > 1
            else [],
        )
    return results


MIN_ONNX_OPSET = 18  # the oldest opset torch's dynamo exporter writes


def validate(cfg: DictConfig) -> None:
    """Fail on settings that types alone cannot catch, before any data is read."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"unknown settings {unknown}: check their spelling")
    if OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError("dataset.root is not set; pass dataset.root=DIR (a folder of images)")
    ks = list(cfg.eval.ks)
    checks = [
        (bool(ks) and all(k > 0 for k in ks), f"eval.ks must be positive, got {ks}"),
        (cfg.search.k is None or cfg.search.k > 0,
         f"search.k must be positive or null (whole database), got {cfg.search.k}"),
        (cfg.search.k is None or not ks or cfg.search.k >= max(ks),
         f"search.k={cfg.search.k} ranks fewer results than eval.ks asks for (up to "
         f"{max(ks or [0])}); metrics past the ranking would be wrong: raise search.k or "
         "drop those ks"),
        (cfg.eval.grid_queries >= 0 and cfg.eval.grid_k > 0,
         "eval.grid_queries must be >= 0 and eval.grid_k positive"),
        (cfg.embedder.threads is None or cfg.embedder.threads >= 1,
         f"embedder.threads must be >= 1 or null (all cores), got {cfg.embedder.threads}"),
        (cfg.decode.max_aspect_ratio >= 1,
         f"decode.max_aspect_ratio must be >= 1, got {cfg.decode.max_aspect_ratio}"),
        (cfg.search.max_pairs_per_chunk > 0,
         f"search.max_pairs_per_chunk must be positive, got {cfg.search.max_pairs_per_chunk}"),
        (cfg.embedder.batch_size > 0,
         f"embedder.batch_size must be positive, got {cfg.embedder.batch_size}"),
        (cfg.embedder.workers is None or cfg.embedder.workers >= 0,
         f"embedder.workers must be >= 0 or null (sized to the machine), got "
         f"{cfg.embedder.workers}"),
        (len(cfg.decode.background) == 3 and all(0 <= v <= 255 for v in cfg.decode.background),
         f"decode.background must be three values in 0..255, got {list(cfg.decode.background)}"),
        (cfg.decode.max_pixels > 0,
         f"decode.max_pixels must be positive, got {cfg.decode.max_pixels}"),
        (0 <= cfg.roi.conf <= 1 and 0 <= cfg.roi.iou <= 1,
         f"roi.conf and roi.iou must be in [0, 1], got {cfg.roi.conf} and {cfg.roi.iou}"),
        (cfg.roi.padding >= 0, f"roi.padding must be >= 0, got {cfg.roi.padding}"),
        (0 <= cfg.roi.min_area < 1, f"roi.min_area must be in [0, 1), got {cfg.roi.min_area}"),
        (cfg.roi.imgsz > 0 and cfg.roi.max_det > 0 and cfg.roi.batch_size > 0,
         "roi.imgsz, roi.max_det and roi.batch_size must be positive"),
        (cfg.eval.bootstrap_resamples > 0,
         f"eval.bootstrap_resamples must be positive, got {cfg.eval.bootstrap_resamples}"),
        (cfg.embedder.onnx_opset >= MIN_ONNX_OPSET,
         f"embedder.onnx_opset must be >= {MIN_ONNX_OPSET} (what torch's ONNX exporter writes), "
         f"got {cfg.embedder.onnx_opset}"),
    ]  # fmt: skip
    problems = [message for ok, message in checks if not ok]
    for name in ("nlist", "M", "nbits", "efConstruction"):
        value = cfg.index[name]
        if value is not None and value < 1:
            problems.append(f"index.{name} must be >= 1, got {value}")
    for name, values in cfg.index.search_grid.items():
        if not values or any(v < 1 for v in values):
            problems.append(f"index.search_grid.{name} must list values >= 1, got {list(values)}")
    problems += _device_problems(cfg.roi.device, "roi.device")
    for value, setting in ((cfg.embedder.backend, "embedder.backend"),
                           (cfg.roi.backend, "roi.backend")):  # fmt: skip
        try:
            runtime.resolve(value, setting)
        except runtime.BackendError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(problems))
    _check_writable(Path(cfg.paths.cache).expanduser(), "paths.cache (VISUAL_SEARCH_CACHE)")
    tracking.check(cfg.tracking)


def _device_problems(device: str, setting: str) -> list[str]:
    """A CUDA device this machine does not have (checked before the detector loads)."""
    if not str(device).startswith("cuda"):
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = str(device).partition(":")[2] or "0"
    if not index.isdigit() or int(index) >= count:
        return [
            f"{setting}={device}: this machine has {count} CUDA device(s); use cpu"
            + (f" or cuda:0..{count - 1}" if count else "")
        ]
    return []


def _check_writable(folder: Path, setting: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{setting}={folder} is not a writable folder: {err.strerror}") from err


def validate_index(cfg: DictConfig, dim: int, n_database: int) -> None:
    """The index settings against the data's size, before any embedding is computed."""
    try:
        index.validate(cfg.index.factory, dim, n_database)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def ensure_something_to_search(embedded: Embedded, out_dir: Path) -> None:
    """Stop with the skip reasons written when a side lost every image."""
    if len(embedded.dataset.query) and len(embedded.dataset.database):
        return
    outputs.write_skipped(out_dir, embedded.skipped)
    side = "query" if not len(embedded.dataset.query) else "database"
    raise NothingToSearch(
        f"every {side} image was skipped ({len(embedded.skipped)} files, reasons in "
        f"{out_dir / 'skipped.csv'}): nothing is left to search"
    )


def decode_settings(cfg: DictConfig) -> DecodeSettings:
    return DecodeSettings(
        tuple(cfg.decode.background), cfg.decode.max_pixels, cfg.decode.max_aspect_ratio
    )


def hash_images(dataset: data.Dataset) -> Images:
    """Hash every image the dataset uses; a file that cannot be read is skipped, not fatal."""
    used = dataset.used_items()
    fingerprint, digests = data.fingerprint(dataset.root, [dataset.items[i] for i in used])
    unreadable = [int(i) for i, d in zip(used, digests, strict=True) if d is None]
    skipped = {**dataset.excluded, **{dataset.items[i]: "file cannot be read" for i in unreadable}}
    readable = {int(i): d for i, d in zip(used, digests, strict=True) if d is not None}
    return Images(dataset.without(unreadable), readable, fingerprint, skipped)


def build_detector(cfg: DictConfig) -> roi.YoloDetector | None:
    if RoiPolicy(cfg.roi.policy) is RoiPolicy.none:
        return None
    return roi.YoloDetector(cfg.roi, cfg.paths.models, cfg.paths.cache)


def plan_crops(cfg: DictConfig, images: Images, detector: roi.Detector | None) -> Crops:
    """Detect objects on the cropped side(s) and choose each image's crop boxes."""
    ds = images.dataset
    whole = Crops([[] for _ in ds.query], [[] for _ in ds.database])
    if detector is None:
        return whole
    side = RoiSide(cfg.roi.side)
    cropped = {
        RoiSide.query: ds.query, RoiSide.database: ds.database,
        RoiSide.both: ds.used_items(),
    }[side]  # fmt: skip
    found, detected, seconds = roi.detect_items(
        detector,
        [ds.root / ds.items[i] for i in cropped],
        [images.digests[i] for i in cropped],
        Path(cfg.paths.cache),
        decode_settings(cfg),
        cfg.roi.batch_size,
    )
    detections = dict(zip(cropped.tolist(), found, strict=True))
    policy = RoiPolicy(cfg.roi.policy)
    boxes = {
        i: roi.choose(det, policy, cfg.roi.padding, cfg.roi.min_area) if det else []
        for i, det in detections.items()
    }
    fallback = {i: not b for i, b in boxes.items()}
    crop_query = side in (RoiSide.query, RoiSide.both)
    crop_database = side in (RoiSide.database, RoiSide.both)
    return Crops(
        [boxes[i] if crop_query else [] for i in ds.query],
        [boxes[i] if crop_database else [] for i in ds.database],
        detections, fallback, detected, seconds,
    )  # fmt: skip


def embed_crops(
    cfg: DictConfig, images: Images, crops: Crops, embedder: embed.Embedder
) -> Embedded:
    """Embed every crop (or whole image) both sides need, re-using cached embeddings.

    Each row is cached under the image's content hash and its crop box, so a whole image is
    shared with runs without ROI, and an unchanged crop is never embedded twice.
    """
    start = time.perf_counter()
    ds = images.dataset
    # Of the decode settings only the background changes pixels; the limits only refuse files.
    producer = {"embedder": embedder.description, "background": list(cfg.decode.background)}
    store = cache.VectorStore(Path(cfg.paths.cache) / "embeddings" / cache.key(producer), producer)

    # One list of (item, box) rows per side; identical crops across sides share a key.
    sides = {
        "query": _side_rows(ds.query, crops.query),
        "database": _side_rows(ds.database, crops.database),
    }
    keys = {row: roi.crop_key(images.digests[row[0]], row[1]) for r in sides.values() for row in r}
    vectors = _cached(store, list(dict.fromkeys(keys.values())))
    todo = list({key: row for row, key in keys.items() if key not in vectors}.values())
    log.info("embeddings: %d cached, %d to compute (%s)", len(vectors), len(todo), store.directory)

    skipped = dict(images.skipped)
    failed: dict[str, str] = {}  # crop key -> why it could not be embedded
    computed_ok = 0
    for part in range(0, len(todo), CACHE_EVERY):
        # Embed and store in parts, so an interrupted run keeps what it already computed.
        rows = todo[part : part + CACHE_EVERY]
        computed, bad = embed.embed_files(
            embedder, [ds.root / ds.items[i] for i, _ in rows], decode_settings(cfg),
            cfg.embedder.batch_size, boxes=[b for _, b in rows],
        )  # fmt: skip
        new = {keys[row]: computed[j] for j, row in enumerate(rows) if j not in bad}
        store.put(list(new), np.stack(list(new.values())) if new else computed[:0])
        vectors.update(new)
        computed_ok += len(new)
        failed.update({keys[rows[j]]: reason for j, reason in bad.items()})
    # Files with the same bytes share a key: each of them is skipped when that key failed.
    skipped.update({ds.items[i]: failed[key] for (i, _), key in keys.items() if key in failed})
    if skipped:
        log.warning("%d images skipped; see skipped.csv", len(skipped))
        ds = ds.without([i for i, item in enumerate(ds.items) if item in skipped])

    def side(items: np.ndarray, rows: list) -> Rows:
        position = {int(item): p for p, item in enumerate(items)}
        kept = [row for row in rows if int(row[0]) in position]
        stacked = [vectors[keys[row]] for row in kept]
        return Rows(
            np.stack(stacked) if stacked else np.zeros((0, embedder.dim), np.float32),
            np.array([position[int(i)] for i, _ in kept], dtype=np.int64),
            [b for _, b in kept],
        )

    return Embedded(
        ds, side(ds.query, sides["query"]), side(ds.database, sides["database"]), skipped,
        computed_ok, time.perf_counter() - start,
    )  # fmt: skip


def _side_rows(items: np.ndarray, boxes: list[list]) -> list[tuple[int, tuple | None]]:
    """(item, box) per embedding row, in the side's order; no box means the whole image."""
    return [(int(i), b) for i, bs in zip(items, boxes, strict=True) for b in (bs or [None])]


def _cached(store: cache.VectorStore, keys: list[str]) -> dict[str, np.ndarray]:
    found, vectors = store.get(keys)
    hits = [k for k, f in zip(keys, found, strict=True) if f]
    return dict(zip(hits, vectors if vectors is not None else [], strict=True))


def build_index(cfg: DictConfig, database: Rows):
    """Build (or load from the cache) the configured index over the database rows."""
    build_params = {"efConstruction": cfg.index.efConstruction}
    try:
        built, path, build_s, cached = index.build_cached(
            database.vectors, cfg.index.factory, Path(cfg.paths.cache), build_params
        )
    except RuntimeError as err:  # FAISS refused what the checks could not foresee
        last = str(err).strip().splitlines()[-1][:300]
        raise ConfigError(f"index.factory={cfg.index.factory!r}: FAISS could not build it on "
                          f"{len(database.vectors)} vectors ({last})") from err  # fmt: skip
    return built, {"index_build_s": round(build_s, 4), "index_bytes": path.stat().st_size,
                   "index_cached": int(cached), "path": path}  # fmt: skip


@dataclass
class Point:
    """One search setting of the grid, its metrics and its rankings."""

    params: dict[str, Any]
    metrics: dict[str, Any]
    evaluation: Evaluation


def search_settings(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every combination of `index.search_grid` (one empty setting when there is none)."""
    grid = {k: list(v) for k, v in cfg.index.search_grid.items()}
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def search_each_setting(cfg: DictConfig, built, embedded: Embedded) -> list[Point]:
    """Score and time every search setting on the one built index.

    Each setting is compared with exact search over the same rows (neighbour recall@10,
    tie-aware), unless the index is exact itself.
    """
    exact = None
    if cfg.index.factory != "Flat":
        exact = search(cfg, index.build(embedded.database.vectors, "Flat"), embedded)
    xq = index.normalise(embedded.query.vectors)
    points = []
    for params in search_settings(cfg):
        index.set_search_params(built, params)
        evaluation = search(cfg, built, embedded)
        found = metrics.summarise(evaluation.per_query, tuple(cfg.eval.ks))
        found["search_s"] = round(evaluation.search_s, 4)
        found.update(timing.single_query_latency(built, xq, k=10))
        found.update(timing.batch_throughput(built, xq, k=10))
        if exact is not None:
            found["neighbour_recall_at_10"] = _neighbour_recall(evaluation, exact, embedded)
        log.info("search %s: map %.4f, p50 %.3f ms", params or "default", found["map"],
                 found["ms_per_query_p50"])  # fmt: skip
        points.append(Point(params, found, evaluation))
    return points


def _neighbour_recall(evaluation: Evaluation, exact: Evaluation, embedded: Embedded) -> float:
    """Recall@10 of the exact top 10; tie-aware where each image is one row, so exact scores of
    the approximate results can be recomputed."""
    ids, exact_ids = evaluation.top_ids[:, :10], exact.top_ids[:, :10]
    if not (embedded.query.one_per_image and embedded.database.one_per_image):
        return metrics.neighbour_recall(ids, exact_ids, k=10)
    xq = index.normalise(embedded.query.vectors)
    xb = index.normalise(embedded.database.vectors)
    scores = np.einsum("qd,qkd->qk", xq, xb[np.maximum(ids, 0)])
    scores = np.where(ids >= 0, scores, -np.inf)
    return metrics.neighbour_recall(ids, exact_ids, exact.top_scores[:, :10], scores, k=10)


def search(cfg: DictConfig, built, embedded: Embedded) -> Evaluation:
    return evaluate(
        built, embedded.query, embedded.database, embedded.dataset, cfg.search.k,
        tuple(sorted({1, 10, *cfg.eval.ks})), TieRule(cfg.eval.ties).value,
        cfg.search.max_pairs_per_chunk,
        keep=max(cfg.eval.grid_k, 10),
    )  # fmt: skip


def summarise(cfg, images: Images, crops: Crops, embedded: Embedded, build: dict) -> dict:
    """Metrics of the stages before search: sizes, skips, detection and build costs."""
    results: dict[str, Any] = {
        "n_queries": len(embedded.dataset.query),
        "n_database": len(embedded.dataset.database),
        "n_skipped": len(embedded.skipped),
        "n_embedded": embedded.n_computed,
        "embed_s": round(embedded.seconds, 3),
        "dataset_fingerprint": images.fingerprint,
        **{k: v for k, v in build.items() if k != "path"},
        **{f"timing_{k}": v for k, v in timing.conditions().items()},
    }
    if crops.detections:
        results.update(
            roi_fallback_rate=round(float(np.mean(list(crops.fallback.values()))), 4),
            n_detected=crops.detected,
            detect_s=round(crops.detect_s, 3),
            detector_images_per_s=round(roi.images_per_second(crops.detected, crops.detect_s), 2),
            n_query_rows=len(embedded.query.owner),
            n_database_rows=len(embedded.database.owner),
        )
    return results


def runtime_conditions(cfg, embedder: embed.Embedder, detector) -> dict[str, Any]:
    """What ran the models, and on how many threads: recorded beside every timing."""
    found = {
        "embed_backend": embedder.backend,
        "embed_workers": embedder.workers,
        "embed_threads_per_worker": embedder.threads,
    }
    if detector is not None:
        found["detect_backend"] = detector.backend
    return found


def compare_with_whole_images(cfg, images: Images, embedded: Embedded, point: Point, embedder):
    """Paired bootstrap of this ROI run against the same queries embedded whole, searched with
    the same index and search setting."""
    ds = embedded.dataset
    whole = embed_crops(
        cfg, Images(ds, images.digests, images.fingerprint),
        Crops([[]] * len(ds.query), [[]] * len(ds.database)), embedder,
    )  # fmt: skip
    built, _ = build_index(cfg, whole.database)
    index.set_search_params(built, point.params)
    baseline = search(cfg, built, whole)
    out = {"baseline_map": float(np.nanmean(baseline.per_query.ap))}
    for name, a, b in [
        ("map", baseline.per_query.ap, point.evaluation.per_query.ap),
        ("recall_at_1", baseline.per_query.any_hit[1], point.evaluation.per_query.any_hit[1]),
    ]:
        diff = stats.paired_bootstrap(a, b, cfg.eval.bootstrap_resamples, seed=cfg.seed)
        out.update(diff.as_metrics(name))
        log.info(
            "%s ROI - whole image: %+.4f (95%% CI %+.4f .. %+.4f, %d queries, %d resamples)",
            name, diff.delta, diff.low, diff.high, diff.n_queries, diff.n_resamples,
        )  # fmt: skip
    return out
