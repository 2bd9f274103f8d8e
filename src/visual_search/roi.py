"""Regions of interest: detect objects, choose a box per image by a policy, crop it.

Boxes are ``(x0, y0, x1, y1)`` in pixels of the decoded, upright image (EXIF orientation
applied), x to the right and y down. Detections are cached per image content and detector
settings, so changing the policy, padding, minimum area or side re-uses them; crops are
identified by the image's content hash and the integer box, so an embedding is recomputed only
when the pixels it sees change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from visual_search import cache, runtime
from visual_search.config import RoiPolicy, RoiSide
from visual_search.images import DecodeError, DecodeSettings, load_rgb

log = logging.getLogger(__name__)

PixelBox = tuple[int, int, int, int]


# none: no detection, every image whole; largest: the box of largest area; most_confident: the
# highest score; center: the box whose centre is nearest the image centre; all: every box is
# embedded and an image is scored by its best crop.
Policy = RoiPolicy
Side = RoiSide


class DetectorError(ValueError):
    """The detector could not be loaded; the message names the setting to change."""


@dataclass
class Detections:
    """What a detector found in one image.

    Attributes:
        boxes: (n, 4) float32 xyxy boxes in pixels of the upright image.
        scores: (n,) float32 confidences.
        classes: (n,) int64 class ids.
        size: (width, height) of the upright image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    size: tuple[int, int]

    def to_record(self) -> dict[str, Any]:
        return {
            "boxes": np.round(self.boxes.astype(np.float64), 2).tolist(),
            "scores": np.round(self.scores.astype(np.float64), 4).tolist(),
            "classes": self.classes.tolist(),
            "size": list(self.size),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Detections:
        return cls(
            np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4),
            np.asarray(record["scores"], dtype=np.float32),
            np.asarray(record["classes"], dtype=np.int64),
            tuple(record["size"]),
        )


class Detector(Protocol):
    """Anything that finds boxes: the YOLO wrapper, or a stub in tests."""

    description: dict[str, Any]
    backend: str  # what runs it, recorded beside its timings

    def detect(self, images: Sequence[Image.Image]) -> list[Detections]: ...


def pixel_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Round boxes outward to whole pixels and clip them to the image.

    Returns:
        (m, 4) int64 boxes; those with zero width or height after rounding are dropped.
    """
    w, h = size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.stack(
        [np.floor(b[:, 0]), np.floor(b[:, 1]), np.ceil(b[:, 2]), np.ceil(b[:, 3])], axis=1
    )
    out = np.clip(out, 0, [w, h, w, h]).astype(np.int64)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep]


def pad_boxes(boxes: np.ndarray, padding: float, size: tuple[int, int]) -> np.ndarray:
    """Grow each box by `padding` times its width (left and right) and height (top and
    bottom), then round and clip it with `pixel_boxes`."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    dx = (b[:, 2] - b[:, 0]) * padding
    dy = (b[:, 3] - b[:, 1]) * padding
    return pixel_boxes(np.stack([b[:, 0] - dx, b[:, 1] - dy, b[:, 2] + dx, b[:, 3] + dy], 1), size)


def choose(
    detections: Detections, policy: Policy, padding: float = 0.0, min_area: float = 0.0
) -> list[PixelBox]:
    """The crop boxes a policy takes from one image's detections; empty means the whole image.

    Boxes are clipped to the image first; boxes that are degenerate after rounding, or cover
    less than `min_area` of the image, are never chosen. Padding is applied to the chosen box.
    """
    if policy is Policy.none or len(detections.boxes) == 0:
        return []
    w, h = detections.size
    clipped = np.clip(detections.boxes.astype(np.float64), 0, [w, h, w, h])
    widths, heights = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = widths * heights
    usable = np.array(
        [
            i
            for i in range(len(clipped))
            if area[i] >= min_area * w * h and len(pixel_boxes(clipped[i], (w, h)))
        ],
        dtype=np.int64,
    )
    if len(usable) == 0:
        return []
    if policy is Policy.all:
        picked = usable
    elif policy is Policy.largest:
        picked = usable[[np.argmax(area[usable])]]
    elif policy is Policy.most_confident:
        picked = usable[[np.argmax(detections.scores[usable])]]
    else:  # centre: nearest box centre to the image centre
        cx = (clipped[usable, 0] + clipped[usable, 2]) / 2 - w / 2
        cy = (clipped[usable, 1] + clipped[usable, 3]) / 2 - h / 2
        picked = usable[[np.argmin(np.hypot(cx, cy))]]
    return [tuple(int(v) for v in box) for box in pad_boxes(clipped[picked], padding, (w, h))]


def crop_key(digest: str, box: PixelBox | None) -> str:
    """Content key of a crop: the image's sha256 alone for the whole image, so ROI-off
    embeddings are shared with runs that have no ROI stage at all."""
    if box is None:
        return digest
    return hashlib.sha256(f"{digest}:{','.join(map(str, box))}".encode()).hexdigest()


class YoloDetector:
    """An ultralytics YOLO model: a ``.pt`` run by torch or, through its ONNX export (made once
    into the cache), by ONNX Runtime; or a ready ``.onnx`` / ``.tflite`` file run as it is."""

    def __init__(self, cfg, models_dir: str | os.PathLike, cache_dir: str | os.PathLike):
        os.environ.setdefault("YOLO_AUTOINSTALL", "false")  # never pip-install at run time
        from ultralytics import YOLO

        self.cfg = cfg
        path = _find_weights(cfg.detector, Path(models_dir).expanduser())
        suffix = Path(path).suffix.lower()
        self.backend = {".onnx": "onnxruntime", ".tflite": "litert"}.get(suffix) or (
            runtime.resolve(cfg.backend, "roi.backend")
        )
        if suffix == ".tflite" and importlib.util.find_spec("ai_edge_litert") is None:
            raise DetectorError(
                f"roi.detector={cfg.detector} is a TFLite model, which needs ai-edge-litert "
                "(pip install -e '.[litert]'); or use a .pt detector"
            )
        try:
            model = YOLO(str(path), task="detect")
            names = model.names
            run = path
            if suffix == ".pt" and self.backend == "onnxruntime":
                run = runtime.export_detector(Path(path), cfg.imgsz, Path(cache_dir).expanduser())
                model = YOLO(str(run), task="detect")
        except Exception as err:  # noqa: BLE001 -- ultralytics raises many kinds when offline
            raise DetectorError(
                f"roi.detector={cfg.detector}: not in paths.models={models_dir} (set "
                f"VISUAL_SEARCH_MODELS) and it could not be fetched or loaded: {err}"
            ) from err
        self.model, self.path = model, Path(run)
        self.class_ids = _class_ids(cfg.classes, names)
        self.description = {
            "detector": Path(path).name,
            "weights_sha256": _sha256(Path(path)) if Path(path).is_file() else str(path),
            "conf": cfg.conf,
            "iou": cfg.iou,
            "classes": self.class_ids,
            "imgsz": cfg.imgsz,
            "max_det": cfg.max_det,
            "batching": "by-size",  # see detect(); detections made otherwise are not reused
        }
        if self.backend != "torch":
            self.description["runtime"] = self.backend

    def detect(self, images: Sequence[Image.Image]) -> list[Detections]:
        """Detections per image, each the same whatever else shares its batch.

        ultralytics letterboxes a batch of one image size to the smallest stride-aligned
        rectangle, but a mixed batch to the full square, and the two find different boxes
        (measured on Corel-1k: 35% of images changed their chosen crop). So each size is
        predicted as its own batch, which is what predicting the image alone gives.
        """
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        out: list[Detections | None] = [None] * len(images)
        # ultralytics sets torch's thread count for the whole process when it picks a CPU
        # device (cores - 1); put it back so the embedder after it keeps every core.
        threads = torch.get_num_threads()
        try:
            for group in by_size.values():
                results = self._predict([images[i] for i in group])
                for i, r in zip(group, results, strict=True):
                    out[i] = Detections(
                        r.boxes.xyxy.cpu().numpy().astype(np.float32),
                        r.boxes.conf.cpu().numpy().astype(np.float32),
                        r.boxes.cls.cpu().numpy().astype(np.int64),
                        images[i].size,
                    )
        finally:
            torch.set_num_threads(threads)
        return out

    def _predict(self, images: Sequence[Image.Image]):
        return self.model.predict(
            list(images),
            conf=self.cfg.conf,
            iou=self.cfg.iou,
            classes=self.class_ids,
            imgsz=self.cfg.imgsz,
            max_det=self.cfg.max_det,
            device=self.cfg.device,
            verbose=False,
        )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _find_weights(name: str, models_dir: Path) -> Path | str:
    """A local file first (the path itself, then in the models directory); else the bare name,
    which ultralytics downloads from its release assets."""
    for candidate in (Path(name).expanduser(), models_dir / name):
        if candidate.is_file():
            return candidate
    log.info("detector %s not found in %s; ultralytics will try to download it", name, models_dir)
    return name


def _class_ids(classes: Sequence[str | int] | None, names: dict[int, str]) -> list[int] | None:
    """COCO names or ids -> ids, refusing unknown ones with the list of valid names."""
    if not classes:
        return None
    by_name = {v: k for k, v in names.items()}
    ids = []
    for c in classes:
        if isinstance(c, int) or str(c).isdigit():
            if int(c) not in names:
                raise DetectorError(f"roi.classes: no class id {c} (0..{max(names)})")
            ids.append(int(c))
        elif c in by_name:
            ids.append(by_name[c])
        else:
            raise DetectorError(f"roi.classes: unknown class {c!r}; valid: {sorted(by_name)}")
    return ids


def detect_items(
    detector: Detector,
    paths: Sequence[Path],
    digests: Sequence[str],
    cache_dir: Path,
    settings: DecodeSettings,
    batch_size: int = 16,
) -> tuple[list[Detections | None], int, float]:
    """Detections for each file, from the cache where present, else by running the detector.

    Returns:
        detections per file (None where the file could not be decoded), the number of images
        the detector ran on, and the seconds it took.
    """
    store = cache.RecordStore(cache_dir / "detections" / cache.key(detector.description),
                              detector.description)  # fmt: skip
    records = store.get(digests)
    todo = [i for i, d in enumerate(digests) if d not in records]
    log.info("detections: %d cached, %d to compute", len(digests) - len(todo), len(todo))
    found: dict[str, dict] = {}
    start = time.perf_counter()
    with tqdm(total=len(todo), unit="img", desc="detect", disable=None) as bar:
        for s in range(0, len(todo), batch_size):
            batch, images = [], []
            for i in todo[s : s + batch_size]:
                try:
                    images.append(load_rgb(paths[i], settings))
                    batch.append(i)
                except DecodeError as err:
                    log.warning("detection skipped %s: %s", paths[i], err.reason)
            for i, det in zip(batch, detector.detect(images) if images else [], strict=True):
                found[digests[i]] = det.to_record()
            bar.update(len(todo[s : s + batch_size]))
    seconds = time.perf_counter() - start
    store.put(found)
    records.update(found)
    out = [Detections.from_record(records[d]) if d in records else None for d in digests]
    return out, len(found), seconds


def images_per_second(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 and n else math.nan
