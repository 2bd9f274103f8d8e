"""Similarity Grad-CAM with the real MobileNetV2 weights on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from visual_search.config import EmbedderConfig, RoiConfig
from visual_search.embed import build_embedder
from visual_search.explain import METHODS, Explainer, ExplainError
from visual_search.images import load_rgb
from visual_search.roi import YoloDetector

from .conftest import DATA, MODELS, needs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    needs(MODELS / "mobilenet_v2_imagenet.pth")
    cfg = OmegaConf.structured(EmbedderConfig(backend="torch"))
    cfg.local_files = {"IMAGENET1K_V1": "mobilenet_v2_imagenet.pth"}
    cfg.preprocess_from = "IMAGENET1K_V1"
    return build_embedder(cfg, MODELS, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """(image, box of the named object) for the smoke images' cat and cup, boxes from YOLO."""
    detector = YoloDetector(OmegaConf.structured(RoiConfig()), MODELS,
                            tmp_path_factory.mktemp("cache"))  # fmt: skip
    found = {}
    for name, wanted in (("skimage_chelsea.png", "cat"), ("skimage_coffee.png", "cup")):
        image = load_rgb(needs(DATA / "smoke_images" / name))
        det = detector.detect([image])[0]
        ids = [i for i, c in enumerate(det.classes) if detector.model.names[int(c)] == wanted]
        assert ids, f"no {wanted} found in {name}"
        best = max(ids, key=lambda i: det.scores[i])
        found[wanted] = (image, tuple(int(v) for v in det.boxes[best]))
    return found


def _in_view(box, size, crop=224, resize=256):
    """A box in image pixels -> the model's view (short side resized, then centre-cropped)."""
    w, h = size
    scale = resize / min(w, h)
    nw, nh = round(w * scale), round(h * scale)
    left, top = int(round((nw - crop) / 2)), int(round((nh - crop) / 2))
    x0, y0, x1, y1 = (v * scale for v in box)
    clip = lambda v: int(min(max(v, 0), crop))  # noqa: E731
    return clip(x0 - left), clip(y0 - top), clip(x1 - left), clip(y1 - top)


@pytest.mark.parametrize("wanted", ["cat", "cup"])
def test_heatmap_peaks_on_the_object_matched_by_its_own_crop(embedder, objects, wanted):
    image, box = objects[wanted]
    explanation = Explainer(embedder, "gradcam").explain([image], [image.crop(box)])
    heatmap = explanation.query_maps[0]
    assert heatmap.shape == (224, 224) and 0 <= heatmap.min() and heatmap.max() <= 1
    x0, y0, x1, y1 = _in_view(box, image.size)
    peak_y, peak_x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert x0 <= peak_x < x1 and y0 <= peak_y < y1, ((peak_x, peak_y), (x0, y0, x1, y1))
    inside = np.zeros_like(heatmap, dtype=bool)
    inside[y0:y1, x0:x1] = True
    if (~inside).mean() > 0.2:  # the cat fills most of its photo; the cup leaves room around it
        assert heatmap[inside].mean() > 1.5 * heatmap[~inside].mean()
    assert explanation.similarity[0] > 0.5


def test_heatmap_changes_when_the_result_changes(embedder, objects):
    cat, box = objects["cat"]
    bus = load_rgb(needs(DATA / "corel1k" / "images" / "301.jpg"))
    explanation = Explainer(embedder).explain([cat, cat], [cat.crop(box), bus])
    a, b = explanation.query_maps
    assert np.abs(a - b).mean() > 0.05
    assert explanation.similarity[0] > explanation.similarity[1]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_maps_and_overlays_without_touching_the_embedder(
    embedder, objects, method
):
    cat, box = objects["cat"]
    explanation = Explainer(embedder, method).explain([cat], [cat.crop(box)])
    ((query, result),) = explanation.overlays()
    assert query.size == result.size == (224, 224)
    assert np.isfinite(explanation.result_maps).all()
    # The in-place activations are switched off in the explainer's copy only.
    inplace = [m.inplace for m in embedder.model.modules() if hasattr(m, "inplace")]
    assert inplace and all(inplace)


def test_bad_method_and_layer_name_the_setting(embedder):
    with pytest.raises(ExplainError, match="explain.method"):
        Explainer(embedder, "magic")
    with pytest.raises(ExplainError, match="explain.target_layer='features.99'"):
        Explainer(embedder, target_layer="features.99")
