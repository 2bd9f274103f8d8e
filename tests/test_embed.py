"""Embedders on real images with the real weights: backends, weights settings, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from visual_search.config import EmbedderConfig
from visual_search.embed import WeightsError, build_embedder, embed_files
from visual_search.images import DecodeSettings, load_rgb
from visual_search.index import normalise

from .conftest import CASES, DATA, MODELS, needs

pytestmark = pytest.mark.slow


def _cfg(**overrides) -> OmegaConf:
    cfg = OmegaConf.structured(EmbedderConfig)
    cfg.local_file = "mobilenet_v2_imagenet.pth"
    cfg.preprocess_from = "IMAGENET1K_V1"
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    needs(MODELS / "mobilenet_v2_imagenet.pth")
    return build_embedder(_cfg(), MODELS, tmp_path_factory.mktemp("cache"))


def _corel(*numbers: int):
    return [needs(DATA / "corel1k" / "images" / f"{n}.jpg") for n in numbers]


def test_pooled_1280_and_preprocessing_from_the_weights(embedder):
    assert embedder.dim == 1280
    assert "resize_size=[256]" in embedder.description["preprocess"]
    assert "crop_size=[224]" in embedder.description["preprocess"]
    assert embedder.description["weights"].startswith("mobilenet_v2_imagenet.pth@sha256:")


def test_predicts_imagenet_classes_with_the_real_weights(tmp_path):
    """The shared weights are a real classifier: the coffee photo is a cup of coffee."""
    import torchvision

    needs(MODELS / "mobilenet_v2_imagenet.pth")
    cfg = _cfg()
    net = build_embedder(cfg, MODELS, tmp_path)
    state = torch.load(MODELS / "mobilenet_v2_imagenet.pth", weights_only=True)
    head = torch.nn.Linear(1280, 1000)
    head.load_state_dict(
        {"weight": state["classifier.1.weight"], "bias": state["classifier.1.bias"]}
    )
    image = load_rgb(needs(DATA / "smoke_images" / "skimage_coffee.png"))
    logits = head(torch.from_numpy(net.embed_images([image])))
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    top5 = [categories[i] for i in logits.topk(5).indices[0]]
    assert {"espresso", "cup", "coffee mug"} & set(top5), top5


def test_batched_files_equal_one_at_a_time(embedder):
    paths = _corel(0, 150, 420, 777)
    batched, skipped = embed_files(embedder, paths, DecodeSettings(), batch_size=3, num_workers=1)
    single = np.concatenate([embedder.embed_images([load_rgb(p)]) for p in paths])
    assert skipped == {}
    assert batched.dtype == np.float32 and batched.shape == (4, 1280)
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)


def test_same_class_closer_than_other_class(embedder):
    buses = normalise(embedder.embed_images([load_rgb(p) for p in _corel(300, 301)]))
    horse = normalise(embedder.embed_images([load_rgb(p) for p in _corel(700)]))
    assert buses[0] @ buses[1] > buses[0] @ horse[0] + 0.2


def test_bad_files_are_skipped_with_reasons_and_the_rest_embedded(embedder):
    paths = [
        *_corel(1),
        needs(CASES / "case04_truncated_jpeg" / "truncated_60pct_128x128.jpg"),
        CASES / "case06_not_an_image" / "plain_text_named.jpeg",
        *_corel(2),
    ]
    out, skipped = embed_files(embedder, paths, DecodeSettings(), batch_size=2, num_workers=1)
    assert sorted(skipped) == [1, 2]
    assert "truncated" in skipped[1]
    assert np.all(out[[1, 2]] == 0) and np.all(np.linalg.norm(out[[0, 3]], axis=1) > 1)


def test_exif_rotated_file_embeds_like_its_upright_reference(embedder):
    case = needs(CASES / "case01_exif_orientation")
    rotated = load_rgb(case / "orientation6_64x32_stored.jpg")
    upright = load_rgb(case / "upright_reference_32x64.png")
    e = normalise(embedder.embed_images([rotated, upright]))
    assert e[0] @ e[1] > 0.98


def test_timm_backend_agrees_with_torchvision_on_the_same_weights(embedder, tmp_path):
    needs(MODELS / "timm_mobilenetv2_100_imagenet.pth")
    cfg = _cfg(
        backend="timm",
        arch="mobilenetv2_100",
        weights="mobilenetv2_100.ra_in1k",
        local_file="timm_mobilenetv2_100_imagenet.pth",
        preprocess_from=None,
    )
    timm_embedder = build_embedder(cfg, MODELS, tmp_path)
    assert timm_embedder.dim == 1280
    assert "Normalize" in timm_embedder.description["preprocess"]
    images = [load_rgb(p) for p in _corel(5, 505)]
    a = normalise(embedder.embed_images(images))
    b = normalise(timm_embedder.embed_images(images))
    # Corel images are already 256 px on the short side, so the backends' different resize
    # filters barely matter and the embeddings must agree.
    assert np.all(np.sum(a * b, axis=1) > 0.999)


def test_weights_as_a_file_path(embedder, tmp_path):
    cfg = _cfg(weights=str(MODELS / "mobilenet_v2_imagenet.pth"), local_file=None)
    by_path = build_embedder(cfg, MODELS, tmp_path)
    image = [load_rgb(_corel(42)[0])]
    np.testing.assert_allclose(
        by_path.embed_images(image), embedder.embed_images(image), rtol=1e-5, atol=1e-5
    )


def test_weights_file_needs_to_say_its_preprocessing(tmp_path):
    cfg = _cfg(weights=str(MODELS / "mobilenet_v2_imagenet.pth"), preprocess_from=None)
    with pytest.raises(WeightsError, match="embedder.preprocess_from"):
        build_embedder(cfg, MODELS, tmp_path)


def test_missing_weights_file_names_the_setting(tmp_path):
    with pytest.raises(WeightsError, match="embedder.weights=.*not a file"):
        build_embedder(_cfg(weights="nowhere/weights.pth"), MODELS, tmp_path)


def test_no_local_weights_and_no_network_names_the_setting(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError, match="VISUAL_SEARCH_MODELS.*network unreachable"):
        build_embedder(_cfg(), tmp_path / "empty", tmp_path)
