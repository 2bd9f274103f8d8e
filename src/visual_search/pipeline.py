"""One experiment: dataset -> decode -> [roi] -> embed -> index -> search -> metrics -> tracking.

`run` reads as one call per stage; each stage hands its artifact to the next and owns nothing
beyond it. Everything that can be checked without compute is checked first, in `validate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from visual_search import cache, data, embed, index, outputs, roi, stats, tracking
from visual_search.config import RoiPolicy, RoiSide, TieRule, unknown_keys
from visual_search.images import DecodeSettings
from visual_search.search import Evaluation, Rows, evaluate

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is wrong; raised before any compute."""


@dataclass
class Images:
    """The dataset's images and their content hashes."""

    dataset: data.Dataset
    digests: dict[int, str]  # item index -> sha256 of the file's bytes
    fingerprint: str


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
    """Run one experiment, write its outputs into `out_dir`, track it, return its metrics."""
    start = time.perf_counter()
    validate(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = hash_images(data.load_dataset(cfg.dataset))
    embedder = embed.build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
    detector = build_detector(cfg)
    crops = plan_crops(cfg, images, detector)
    embedded = embed_crops(cfg, images, crops, embedder)
    built, build_s = build_index(cfg, embedded.database)
    evaluation = search(cfg, built, embedded)
    results = summarise(cfg, images, crops, embedded, evaluation, build_s)
    if detector is not None:
        results.update(compare_with_whole_images(cfg, images, embedded, evaluation, embedder))
    results["total_s"] = round(time.perf_counter() - start, 3)
    if crops.detect_s:
        results["detect_share"] = round(crops.detect_s / results["total_s"], 4)
    artifacts = outputs.write(cfg, embedded, crops, evaluation, results, out_dir)
    if cfg.tracking.enabled:
        results["mlflow_run_id"] = tracking.log_run(
            cfg.tracking,
            OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            _numeric(results),
            artifacts,
        )
    return results


def validate(cfg: DictConfig) -> None:
    """Fail on settings that types alone cannot catch, before any data is read."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"unknown settings {unknown}: check their spelling")
    if OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError("dataset.root is not set; pass dataset.root=DIR (a folder of images)")
    checks = [
        (all(k > 0 for k in cfg.eval.ks), f"eval.ks must be positive, got {list(cfg.eval.ks)}"),
        (cfg.search.k is None or cfg.search.k > 0,
         f"search.k must be positive or null (whole database), got {cfg.search.k}"),
        (cfg.search.max_pairs_per_chunk > 0,
         f"search.max_pairs_per_chunk must be positive, got {cfg.search.max_pairs_per_chunk}"),
        (cfg.embedder.batch_size > 0,
         f"embedder.batch_size must be positive, got {cfg.embedder.batch_size}"),
        (cfg.embedder.num_workers is None or cfg.embedder.num_workers >= 0,
         f"embedder.num_workers must be >= 0 or null, got {cfg.embedder.num_workers}"),
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
    ]  # fmt: skip
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError("; ".join(problems))


def decode_settings(cfg: DictConfig) -> DecodeSettings:
    return DecodeSettings(tuple(cfg.decode.background), cfg.decode.max_pixels)


def hash_images(dataset: data.Dataset) -> Images:
    used = dataset.used_items()
    fingerprint, digests = data.fingerprint(dataset.root, [dataset.items[i] for i in used])
    return Images(dataset, dict(zip(used.tolist(), digests, strict=True)), fingerprint)


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
    producer = {"embedder": embedder.description, "decode": OmegaConf.to_container(cfg.decode)}
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

    skipped: dict[str, str] = {}
    if todo:
        computed, bad = embed.embed_files(
            embedder, [ds.root / ds.items[i] for i, _ in todo], decode_settings(cfg),
            cfg.embedder.batch_size, cfg.embedder.num_workers, boxes=[b for _, b in todo],
        )  # fmt: skip
        new = {keys[row]: computed[j] for j, row in enumerate(todo) if j not in bad}
        store.put(list(new), np.stack(list(new.values())) if new else computed[:0])
        vectors.update(new)
        skipped = {ds.items[todo[j][0]]: reason for j, reason in bad.items()}
    if skipped:
        log.warning("%d images skipped (undecodable); see skipped.csv", len(skipped))
        ds = ds.without([ds.items.index(p) for p in skipped])

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
        len(todo), time.perf_counter() - start,
    )  # fmt: skip


def _side_rows(items: np.ndarray, boxes: list[list]) -> list[tuple[int, tuple | None]]:
    """(item, box) per embedding row, in the side's order; no box means the whole image."""
    return [(int(i), b) for i, bs in zip(items, boxes, strict=True) for b in (bs or [None])]


def _cached(store: cache.VectorStore, keys: list[str]) -> dict[str, np.ndarray]:
    found, vectors = store.get(keys)
    hits = [k for k, f in zip(keys, found, strict=True) if f]
    return dict(zip(hits, vectors if vectors is not None else [], strict=True))


def build_index(cfg: DictConfig, database: Rows):
    start = time.perf_counter()
    built = index.build(database.vectors, cfg.index.factory)
    return built, time.perf_counter() - start


def search(cfg: DictConfig, built, embedded: Embedded) -> Evaluation:
    return evaluate(
        built, embedded.query, embedded.database, embedded.dataset, cfg.search.k,
        tuple(sorted({1, *cfg.eval.ks})), TieRule(cfg.eval.ties).value,
        cfg.search.max_pairs_per_chunk,
        keep=max(cfg.eval.grid_k, 10),
    )  # fmt: skip


def summarise(cfg, images: Images, crops: Crops, embedded: Embedded, evaluation, build_s) -> dict:
    from visual_search import metrics

    results: dict[str, Any] = metrics.summarise(evaluation.per_query, tuple(cfg.eval.ks))
    results.update(
        n_database=len(embedded.dataset.database),
        n_skipped=len(embedded.skipped),
        n_embedded=embedded.n_computed,
        embed_s=round(embedded.seconds, 3),
        index_build_s=round(build_s, 4),
        search_s=round(evaluation.search_s, 4),
        dataset_fingerprint=images.fingerprint,
    )
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


def compare_with_whole_images(cfg, images: Images, embedded: Embedded, evaluation, embedder):
    """Paired bootstrap of this ROI run against the same queries embedded whole."""
    whole_images = Images(embedded.dataset, images.digests, images.fingerprint)
    ds = embedded.dataset
    whole = embed_crops(
        cfg, whole_images, Crops([[]] * len(ds.query), [[]] * len(ds.database)), embedder
    )
    built, _ = build_index(cfg, whole.database)
    baseline = search(cfg, built, whole)
    out = {"baseline_map": float(np.nanmean(baseline.per_query.ap))}
    for name, a, b in [
        ("map", baseline.per_query.ap, evaluation.per_query.ap),
        ("recall_at_1", baseline.per_query.any_hit[1], evaluation.per_query.any_hit[1]),
    ]:
        diff = stats.paired_bootstrap(a, b, cfg.eval.bootstrap_resamples, seed=cfg.seed)
        out.update(diff.as_metrics(name))
        log.info(
            "%s ROI - whole image: %+.4f (95%% CI %+.4f .. %+.4f, %d queries, %d resamples)",
            name, diff.delta, diff.low, diff.high, diff.n_queries, diff.n_resamples,
        )  # fmt: skip
    return out


def _numeric(results: dict) -> dict[str, float]:
    return {
        k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
