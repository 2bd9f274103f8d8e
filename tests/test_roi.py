"""ROI stage: box geometry and policies with a stub detector, the detection cache, best-crop
search, and the real YOLO weights on the smoke images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from visual_search import index, pipeline, roi
from visual_search.config import RoiConfig
from visual_search.images import DecodeSettings
from visual_search.search import Rows, best_crop_search

from .conftest import DATA, MODELS, needs


def _det(boxes, scores=None, size=(100, 80), classes=None) -> roi.Detections:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(boxes)
    return roi.Detections(
        boxes,
        np.asarray(scores if scores is not None else np.linspace(0.9, 0.5, n), np.float32),
        np.asarray(classes if classes is not None else [0] * n, np.int64),
        size,
    )


# --- geometry ------------------------------------------------------------------------------


def test_boxes_round_outward_and_clip_to_the_image():
    out = roi.pixel_boxes(np.array([[-5.5, 10.2, 40.7, 90.0], [10.1, 10.9, 20.5, 30.0]]), (100, 80))
    assert out.tolist() == [[0, 10, 41, 80], [10, 10, 21, 30]]


def test_degenerate_boxes_are_dropped():
    boxes = np.array([[10, 10, 10, 50], [5, 5, 60, 5], [120, 10, 150, 20], [1, 1, 2, 2]])
    assert roi.pixel_boxes(boxes, (100, 80)).tolist() == [[1, 1, 2, 2]]


def test_padding_grows_each_side_by_a_fraction_and_clips():
    # 20 x 40 box, padding 0.25 -> 5 px left/right, 10 px top/bottom.
    assert roi.pad_boxes(np.array([[30, 20, 50, 60]]), 0.25, (100, 80)).tolist() == [
        [25, 10, 55, 70]
    ]
    assert roi.pad_boxes(np.array([[0, 0, 50, 60]]), 0.5, (100, 80)).tolist() == [[0, 0, 75, 80]]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (roi.Policy.largest, [(0, 0, 60, 60)]),
        (roi.Policy.most_confident, [(70, 60, 90, 75)]),
        (roi.Policy.center, [(40, 30, 60, 50)]),
        (roi.Policy.all, [(0, 0, 60, 60), (40, 30, 60, 50), (70, 60, 90, 75)]),
        (roi.Policy.none, []),
    ],
)
def test_each_policy_picks_its_box(policy, expected):
    det = _det(
        [[0, 0, 60, 60], [40, 30, 60, 50], [70, 60, 90, 75]], scores=[0.5, 0.6, 0.9]
    )  # image 100 x 80, centre (50, 40): the middle box is centred on it
    assert roi.choose(det, policy) == expected


def test_min_area_drops_small_boxes_and_no_box_means_fallback():
    det = _det([[0, 0, 5, 5], [10, 10, 14, 14]])  # 25 and 16 px of an 8000 px image
    assert roi.choose(det, roi.Policy.largest, min_area=0.01) == []
    assert roi.choose(det, roi.Policy.largest, min_area=0.0) == [(0, 0, 5, 5)]
    assert roi.choose(_det([]), roi.Policy.largest) == []


def test_boxes_past_the_border_are_clipped_before_choosing():
    # The first box is mostly outside: clipped it is 10 x 10, smaller than the second.
    det = _det([[-200, -200, 10, 10], [50, 50, 70, 70]])
    assert roi.choose(det, roi.Policy.largest) == [(50, 50, 70, 70)]


def test_crop_key_is_the_image_hash_for_whole_images():
    assert roi.crop_key("abc", None) == "abc"
    assert roi.crop_key("abc", (1, 2, 3, 4)) != roi.crop_key("abc", (1, 2, 3, 5))


# --- a stub detector through the pipeline --------------------------------------------------


class StubDetector:
    """A box over the left half of each image, or none for images whose id is listed."""

    def __init__(self, empty: set[int] = frozenset()):
        self.description = {"detector": "stub", "version": 1}
        self.backend = "stub"
        self.calls = 0
        self.empty = empty

    def detect(self, images):
        self.calls += len(images)
        out = []
        for im in images:
            w, h = im.size
            boxes = [] if (w * h) % 7 in self.empty else [[0, 0, w / 2, h]]
            out.append(_det(boxes, size=(w, h)))
        return out


def test_detections_are_cached_per_image_and_detector(tmp_path):
    paths = [needs(DATA / "corel1k" / "images" / f"{n}.jpg") for n in (0, 1, 2)]
    digests = ["a", "b", "c"]
    stub = StubDetector()
    first, ran, _ = roi.detect_items(stub, paths, digests, tmp_path, DecodeSettings(), 2)
    again, ran_again, _ = roi.detect_items(stub, paths, digests, tmp_path, DecodeSettings(), 2)
    assert (ran, ran_again, stub.calls) == (3, 0, 3)
    assert [d.boxes.tolist() for d in first] == [d.boxes.tolist() for d in again]
    other = StubDetector()
    other.description = {"detector": "stub", "version": 2}
    roi.detect_items(other, paths, digests, tmp_path, DecodeSettings(), 2)
    assert other.calls == 3  # other settings, other cache


@pytest.fixture
def stub_runs(compose_config, monkeypatch, tmp_path):
    needs(DATA / "corel1k")
    stub = StubDetector()
    monkeypatch.setattr(
        pipeline, "build_detector", lambda cfg: None if cfg.roi.policy.name == "none" else stub
    )

    def run(name: str, *overrides: str):
        cfg = compose_config("dataset.limit_per_class=2", "tracking.enabled=false", *overrides)
        return pipeline.run(cfg, tmp_path / name)

    return stub, run


@pytest.mark.slow
def test_policy_or_padding_changes_reuse_detections(stub_runs, tmp_path):
    stub, run = stub_runs
    first = run("a", "roi=yolo", "roi.padding=0.0")
    assert first["n_detected"] == 20 and stub.calls == 20
    second = run("b", "roi=yolo", "roi.padding=0.3", "roi.policy=most_confident")
    assert second["n_detected"] == 0 and stub.calls == 20
    assert second["n_embedded"] == 20  # new crops are embedded, nothing else
    records = [
        json.loads(line) for line in (tmp_path / "a" / "crops.jsonl").read_text().splitlines()
    ]
    assert len(records) == 20 and all(r["chosen"] != "fallback" for r in records)
    w, h = records[0]["detections"]["size"]
    assert records[0]["chosen"] == [[0, 0, math.ceil(w / 2), h]]


@pytest.mark.slow
def test_no_detection_falls_back_to_the_whole_image_and_matches_the_plain_pipeline(
    stub_runs, monkeypatch
):
    stub, run = stub_runs
    stub.empty = set(range(7))  # every image: no box
    plain = run("plain")
    fallback = run("fallback", "roi=yolo")
    assert fallback["roi_fallback_rate"] == 1.0
    for key in ("map", "precision_at_10", "recall_at_1"):
        assert fallback[key] == plain[key]
    assert fallback["map_delta"] == 0.0 and fallback["map_delta_ci_low"] == 0.0


@pytest.mark.slow
def test_roi_off_embeddings_are_bit_identical_to_embedding_without_the_stage(
    compose_config, tmp_path
):
    from visual_search import data, embed

    cfg = compose_config("dataset.limit_per_class=1", "tracking.enabled=false")
    images = pipeline.hash_images(data.load_dataset(cfg.dataset))
    embedder = embed.build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
    crops = pipeline.plan_crops(cfg, images, None)
    embedded = pipeline.embed_crops(cfg, images, crops, embedder)
    ds = images.dataset
    paths = [ds.root / ds.items[i] for i in ds.database]
    direct, _ = embed.embed_files(
        embedder, paths, pipeline.decode_settings(cfg), cfg.embedder.batch_size
    )
    assert np.array_equal(embedded.database.vectors, direct)


# --- best-crop search ----------------------------------------------------------------------


def test_best_crop_search_equals_brute_force_max_over_crop_pairs():
    rng = np.random.default_rng(3)
    db_owner = np.array([0, 0, 1, 2, 2, 2, 3, 4])  # 5 database images, 8 rows
    q_owner = np.array([0, 1, 1])  # 2 query images, 3 rows
    db = index.normalise(rng.normal(size=(8, 16)))
    q = index.normalise(rng.normal(size=(3, 16)))
    built = index.build(db)
    database = Rows(db, db_owner, [None] * 8)
    scores, ids = best_crop_search(built, q, q_owner, database, 5, 5, np.array([-1, 3]))

    sim = q @ db.T
    for qi in range(2):
        per_image = [sim[q_owner == qi][:, db_owner == d].max() for d in range(5)]
        if qi == 1:
            per_image[3] = -np.inf  # excluded: the query itself
        expected = [d for d in np.argsort(per_image)[::-1] if np.isfinite(per_image[d])]
        assert ids[qi][ids[qi] >= 0].tolist() == expected
        np.testing.assert_allclose(
            scores[qi][: len(expected)], np.sort(per_image)[::-1][: len(expected)], rtol=1e-5
        )


def test_truncated_best_crop_search_keeps_the_true_top_k():
    rng = np.random.default_rng(4)
    db_owner = np.repeat(np.arange(20), 3)
    db = index.normalise(rng.normal(size=(60, 8)))
    q = index.normalise(rng.normal(size=(1, 8)))
    built = index.build(db)
    full_scores, full_ids = best_crop_search(
        built, q, np.array([0]), Rows(db, db_owner, []), 20, 20, np.array([-1])
    )
    top_scores, top_ids = best_crop_search(
        built, q, np.array([0]), Rows(db, db_owner, []), 20, 4, np.array([-1])
    )
    assert top_ids[0].tolist() == full_ids[0][:4].tolist()


# --- real weights ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("image", "label"),
    [
        ("skimage_coffee.png", "cup"),
        ("skimage_chelsea.png", "cat"),
        ("skimage_astronaut.png", "person"),
    ],
)
def test_yolo_finds_the_object_in_the_smoke_images(image, label, tmp_path, monkeypatch):
    from visual_search.images import load_rgb

    needs(MODELS / "yolov8n.pt")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    cfg = OmegaConf.structured(RoiConfig)
    detector = roi.YoloDetector(cfg, MODELS, tmp_path)
    picture = load_rgb(needs(DATA / "smoke_images" / image))
    (found,) = detector.detect([picture])
    names = [detector.model.names[int(c)] for c in found.classes]
    assert label in names, names
    box = found.boxes[names.index(label)]
    assert 0 <= box[0] < box[2] <= picture.width and 0 <= box[1] < box[3] <= picture.height
    chosen = roi.choose(found, roi.Policy.most_confident)
    assert len(chosen) == 1


@pytest.mark.slow
def test_class_filter_by_name_and_unknown_class(tmp_path, monkeypatch):
    needs(MODELS / "yolov8n.pt")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    cfg = OmegaConf.structured(RoiConfig)
    cfg.classes = ["cup"]
    detector = roi.YoloDetector(cfg, MODELS, tmp_path)
    from visual_search.images import load_rgb

    (found,) = detector.detect([load_rgb(DATA / "smoke_images" / "skimage_coffee.png")])
    assert set(found.classes.tolist()) == {41}  # COCO 'cup'
    cfg.classes = ["unicorn"]
    with pytest.raises(roi.DetectorError, match="unicorn"):
        roi.YoloDetector(cfg, MODELS, tmp_path)


def test_missing_detector_offline_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    cfg = OmegaConf.structured(RoiConfig)
    cfg.detector = "yolo_that_does_not_exist.pt"
    with pytest.raises(roi.DetectorError, match="roi.detector=yolo_that_does_not_exist.pt"):
        roi.YoloDetector(cfg, tmp_path, tmp_path)


def test_image_with_a_crop_is_cut_before_preprocessing(tmp_path):
    """embed_files crops the upright image with the box before preprocessing."""
    from visual_search.embed import _ImageFiles

    path = tmp_path / "im.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path)
    seen = []
    files = _ImageFiles(
        [path], lambda im: seen.append(im.size) or im, DecodeSettings(), [(0, 0, 10, 5)]
    )
    files[0]
    assert seen == [(10, 5)]
