"""ONNX Runtime backends: the same embeddings, metrics and boxes as torch, and their exports."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
from omegaconf import OmegaConf

from visual_search import pipeline, runtime
from visual_search.config import RoiConfig
from visual_search.embed import build_embedder, embed_files
from visual_search.images import DecodeSettings, load_rgb
from visual_search.pipeline import ConfigError
from visual_search.roi import DetectorError, YoloDetector

from .conftest import DATA, MODELS, embedder_config, needs

pytestmark = pytest.mark.skipif(
    not runtime.onnxruntime_installed(), reason="onnxruntime is not installed"
)
SMOKE = ("skimage_chelsea.png", "skimage_coffee.png", "skimage_astronaut.png",
         "skimage_motorcycle_left.png", "skimage_rocket.jpg", "sklearn_china.jpg")  # fmt: skip


_cfg = embedder_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def embedders(cache_dir):
    needs(MODELS / "mobilenet_v2_imagenet.pth")
    return {b: build_embedder(_cfg(backend=b), MODELS, cache_dir) for b in ("torch", "onnxruntime")}


def _corel(step: int = 25):
    root = needs(DATA / "corel1k" / "images")
    return [root / f"{n}.jpg" for n in range(0, 1000, step)]


def test_auto_picks_onnxruntime_when_installed_and_torch_otherwise(monkeypatch):
    assert runtime.resolve("auto", "embedder.backend") == "onnxruntime"
    monkeypatch.setattr(runtime, "onnxruntime_installed", lambda: False)
    assert runtime.resolve("auto", "embedder.backend") == "torch"
    with pytest.raises(runtime.BackendError, match="embedder.backend=onnxruntime.*not installed"):
        runtime.resolve("onnxruntime", "embedder.backend")


def test_unknown_backend_fails_before_any_compute(compose_config):
    with pytest.raises(ConfigError, match="roi.backend must be one of auto, torch, onnxruntime"):
        pipeline.validate(compose_config("roi=yolo", "roi.backend=tensorrt"))
    with pytest.raises(ConfigError, match="embedder.backend must be one of"):
        pipeline.validate(compose_config("embedder.backend=openvino"))


@pytest.mark.slow
def test_onnx_embeddings_match_torch_per_image_on_real_images(embedders):
    paths = _corel() + [needs(DATA / "smoke_images" / name) for name in SMOKE]
    settings = DecodeSettings()
    reference, skipped = embed_files(embedders["torch"], paths, settings, workers=0)
    fast, skipped_fast = embed_files(embedders["onnxruntime"], paths, settings)
    assert skipped == skipped_fast == {}
    cosine = np.sum(reference * fast, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(fast, axis=1)
    )
    assert cosine.min() >= 0.9999, cosine.min()
    assert np.abs(reference - fast).max() < 1e-4
    # One image alone (a dynamic batch of 1) gives the same vector as inside a batch.
    single = embedders["onnxruntime"].embed_images([load_rgb(paths[3])])
    np.testing.assert_allclose(single[0], fast[3], atol=1e-5)


@pytest.mark.slow
def test_workers_do_not_change_the_embeddings(embedders):
    paths, settings = _corel(50), DecodeSettings()
    for embedder in embedders.values():
        serial, _ = embed_files(embedder, paths, settings, batch_size=3, workers=0)
        parallel, _ = embed_files(embedder, paths, settings, batch_size=3, workers=3)
        np.testing.assert_allclose(serial, parallel, atol=1e-6)


def test_descriptions_differ_so_caches_never_mix(embedders):
    torch_key, onnx_key = (embedders[b].description for b in ("torch", "onnxruntime"))
    assert torch_key != onnx_key
    assert onnx_key["runtime"].startswith("onnxruntime ")
    assert embedders["onnxruntime"].backend == "onnxruntime"


def test_export_is_cached_and_redone_when_its_settings_change(embedders, cache_dir):
    exports = sorted((cache_dir / "exports" / "embedder").glob("*.onnx"))
    assert len(exports) == 1
    before = exports[0].stat().st_mtime_ns
    build_embedder(_cfg(backend="onnxruntime"), MODELS, cache_dir)
    assert exports[0].stat().st_mtime_ns == before  # re-used, not exported again
    build_embedder(_cfg(backend="onnxruntime", onnx_opset=17), MODELS, cache_dir)
    assert len(list((cache_dir / "exports" / "embedder").glob("*.onnx"))) == 2


def test_damaged_cached_export_is_exported_again(tmp_path):
    needs(MODELS / "mobilenet_v2_imagenet.pth")
    first = build_embedder(_cfg(backend="onnxruntime"), MODELS, tmp_path)
    (export,) = (tmp_path / "exports" / "embedder").glob("*.onnx")
    export.write_bytes(export.read_bytes()[:1000])  # a truncated file, as a killed copy leaves
    again = build_embedder(_cfg(backend="onnxruntime"), MODELS, tmp_path)
    image = [load_rgb(_corel()[0])]
    np.testing.assert_allclose(again.embed_images(image), first.embed_images(image), atol=1e-6)


@pytest.mark.slow
def test_corel_metrics_equal_to_three_decimals(compose_config, tmp_path):
    needs(DATA / "corel1k" / "labels.csv")
    results = {
        backend: pipeline.run(
            compose_config(f"embedder.backend={backend}", "tracking.enabled=false"),
            tmp_path / backend,
        )
        for backend in ("torch", "onnxruntime")
    }
    assert results["onnxruntime"]["embed_backend"] == "onnxruntime"
    for key in ("map", "precision_at_10", "recall_at_1", "recall_at_10"):
        assert round(results["torch"][key], 3) == round(results["onnxruntime"][key], 3), key


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="module")
def read_only_models(tmp_path_factory):
    """The detector weights alone in a read-only folder: an export beside them would fail."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(needs(MODELS / "yolov8n.pt"), folder / "yolov8n.pt")
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    yield folder
    folder.chmod(stat.S_IRWXU)


@pytest.mark.slow
def test_detector_boxes_agree_with_torch_and_export_goes_to_the_cache(
    read_only_models, cache_dir, monkeypatch
):
    monkeypatch.delenv("YOLO_AUTOINSTALL", raising=False)
    images = [load_rgb(needs(DATA / "smoke_images" / name)) for name in SMOKE]
    found = {}
    for backend in ("torch", "onnxruntime"):
        cfg = OmegaConf.structured(RoiConfig(backend=backend))
        detector = YoloDetector(cfg, read_only_models, cache_dir)
        assert detector.backend == backend
        found[backend] = detector.detect(images)
    assert os.environ["YOLO_AUTOINSTALL"] == "false"
    assert sorted(p.name for p in read_only_models.iterdir()) == ["yolov8n.pt"]
    assert detector.path.parent == cache_dir / "exports" / "detector"
    assert sum(len(d.boxes) for d in found["torch"]) >= 6  # cat, cup, person, motorbikes...
    for reference, fast in zip(found["torch"], found["onnxruntime"], strict=True):
        assert len(reference.boxes) == len(fast.boxes)
        for box, cls in zip(reference.boxes, reference.classes, strict=True):
            same = fast.classes == cls
            assert same.any()
            assert max(_iou(box, other) for other in fast.boxes[same]) >= 0.9


def test_tflite_detector_without_its_runtime_names_the_setting(monkeypatch, tmp_path):
    import importlib.util

    tflite = needs(MODELS / "yolov8n_int8.tflite")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "ai_edge_litert" else real(name, *a),
    )  # fmt: skip
    cfg = OmegaConf.structured(RoiConfig(detector=str(tflite)))
    with pytest.raises(DetectorError, match="roi.detector=.*tflite.*ai-edge-litert"):
        YoloDetector(cfg, MODELS, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_detections_do_not_depend_on_what_shares_the_batch(backend, cache_dir):
    """Corel-1k mixes 384x256 and 256x384 photos; each image's boxes must be those it gets
    alone, or a cached study would change with which images happened to be computed together."""
    images = [load_rgb(p) for p in _corel(7)[:24]]
    assert len({im.size for im in images}) > 1
    detector = YoloDetector(OmegaConf.structured(RoiConfig(backend=backend)), MODELS, cache_dir)
    together = detector.detect(images)
    for image, found in zip(images, together, strict=True):
        alone = detector.detect([image])[0]
        # Equal but for float rounding between batch sizes (measured: at most 0.01 px).
        assert alone.classes.tolist() == found.classes.tolist()
        np.testing.assert_allclose(alone.boxes, found.boxes, atol=0.05)
        np.testing.assert_allclose(alone.scores, found.scores, atol=1e-3)
