"""Embedders on real images with the real weights: libraries, weights settings, decoding."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from visual_search import embed
from visual_search.embed import WeightsError, build_embedder, embed_files
from visual_search.images import DecodeSettings, load_rgb
from visual_search.index import normalise

from .conftest import CASES, DATA, MODELS, embedder_config, needs

pytestmark = pytest.mark.slow


_cfg = embedder_config


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
    with torch.inference_mode():  # the torch model's pooled features, before normalisation
        logits = head(net.model(net.transform(image)[None]))
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    top5 = [categories[i] for i in logits.topk(5).indices[0]]
    assert {"espresso", "cup", "coffee mug"} & set(top5), top5


def test_batched_files_equal_one_at_a_time(embedder):
    paths = _corel(0, 150, 420, 777)
    batched, skipped = embed_files(embedder, paths, DecodeSettings(), batch_size=3, workers=2)
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
    out, skipped = embed_files(embedder, paths, DecodeSettings(), batch_size=2, workers=2)
    assert sorted(skipped) == [1, 2]
    assert "truncated" in skipped[1]
    assert np.all(out[[1, 2]] == 0)
    assert np.allclose(np.linalg.norm(out[[0, 3]], axis=1), 1, atol=1e-5)


def test_exif_rotated_file_embeds_like_its_upright_reference(embedder):
    case = needs(CASES / "case01_exif_orientation")
    rotated = load_rgb(case / "orientation6_64x32_stored.jpg")
    upright = load_rgb(case / "upright_reference_32x64.png")
    e = normalise(embedder.embed_images([rotated, upright]))
    assert e[0] @ e[1] > 0.98


def test_timm_library_agrees_with_torchvision_on_the_same_weights(embedder, tmp_path):
    needs(MODELS / "timm_mobilenetv2_100_imagenet.pth")
    cfg = _cfg(
        library="timm",
        arch="mobilenetv2_100",
        weights="mobilenetv2_100.ra_in1k",
        local_files={"mobilenetv2_100.ra_in1k": "timm_mobilenetv2_100_imagenet.pth"},
        preprocess_from=None,
    )
    timm_embedder = build_embedder(cfg, MODELS, tmp_path)
    assert timm_embedder.dim == 1280
    assert "Normalize" in timm_embedder.description["preprocess"]
    images = [load_rgb(p) for p in _corel(5, 505)]
    a = normalise(embedder.embed_images(images))
    b = normalise(timm_embedder.embed_images(images))
    # Corel images are already 256 px on the short side, so the libraries' different resize
    # filters barely matter and the embeddings must agree.
    assert np.all(np.sum(a * b, axis=1) > 0.999)


def test_weights_as_a_file_path(embedder, tmp_path):
    cfg = _cfg(weights=str(MODELS / "mobilenet_v2_imagenet.pth"), local_files={})
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


def _timm_cfg(**overrides) -> OmegaConf:
    timm = {
        "library": "timm",
        "arch": "mobilenetv2_100",
        "weights": "mobilenetv2_100.ra_in1k",
        "local_files": {"mobilenetv2_100.ra_in1k": "timm_mobilenetv2_100_imagenet.pth"},
        "preprocess_from": None,
    }
    return _cfg(**{**timm, **overrides})


def _published(state_of=None):
    """Stand-in for a torchvision download: records which weights were asked for."""
    asked = []

    def get_state_dict(self, *args, **kwargs):
        asked.append(self.name)
        if state_of is None:
            raise OSError("network unreachable")
        return torch.load(state_of, weights_only=True)

    return asked, get_state_dict


@pytest.mark.parametrize("name", ["IMAGENET1K_V2", "DEFAULT"])
def test_local_file_stands_only_for_its_own_weights(name, tmp_path, monkeypatch):
    """The local V1 file must not be loaded for V2: V2 is downloaded, with V2's preprocessing."""
    import torchvision

    asked, get_state_dict = _published(needs(MODELS / "mobilenet_v2_imagenet.pth"))
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", get_state_dict)
    net = build_embedder(_cfg(weights=name), MODELS, tmp_path)
    assert asked == ["IMAGENET1K_V2"]
    v2 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    assert net.description["weights"] == v2.url.rsplit("/", 1)[-1]
    assert net.description["preprocess"] == repr(v2.transforms())


def test_mapped_file_absent_is_downloaded(tmp_path, monkeypatch):
    import torchvision

    asked, get_state_dict = _published()
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", get_state_dict)
    with pytest.raises(WeightsError, match=r"mobilenet_v2_imagenet.pth is absent.*unreachable"):
        build_embedder(_cfg(), tmp_path, tmp_path)
    assert asked == ["IMAGENET1K_V1"]


@pytest.mark.parametrize("weights", ["w/my_weights.ckpt", "IMAGENET1K_V3", "my_weights.ckpt"])
def test_torchvision_weights_neither_name_nor_file(weights, tmp_path):
    with pytest.raises(WeightsError) as err:
        build_embedder(_cfg(weights=weights), MODELS, tmp_path)
    assert f"embedder.weights={weights!r} is not a file" in str(err.value)
    assert "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT" in str(err.value)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("w/my_weights.ckpt", r"embedder.weights='w/my_weights.ckpt' is not a file"),
        ("weights.safetensors", r"embedder.weights='weights.safetensors' is not a file"),
        ("mobilenetv2_100.no_such_tag", r"nor a timm pretrained .*mobilenetv2_100.ra_in1k"),
        ("no_such_net", r"'no_such_net' is neither a file path .* nor a timm pretrained"),
        (
            "resnet50.a1_in1k",
            r"timm name 'resnet50.a1_in1k' has architecture 'resnet50', embedder.arch is "
            r"'mobilenetv2_100'",
        ),
    ],
)
def test_timm_weights_neither_name_nor_file(weights, message, tmp_path, monkeypatch):
    import timm

    def no_download(*args, **kwargs):
        raise AssertionError("must fail before creating a model")

    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(WeightsError, match=message):
        build_embedder(_timm_cfg(weights=weights), MODELS, tmp_path)


def test_timm_name_without_tag_uses_the_default_tags_local_file(tmp_path):
    needs(MODELS / "timm_mobilenetv2_100_imagenet.pth")
    net = build_embedder(_timm_cfg(weights="mobilenetv2_100"), MODELS, tmp_path)
    assert net.description["weights"].startswith("timm_mobilenetv2_100_imagenet.pth@sha256:")


def test_timm_weights_file_inside_paths_models(tmp_path):
    needs(MODELS / "timm_mobilenetv2_100_imagenet.pth")
    cfg = _timm_cfg(weights="timm_mobilenetv2_100_imagenet.pth", local_files={})
    net = build_embedder(cfg, MODELS, tmp_path)
    assert net.description["weights"].startswith("timm_mobilenetv2_100_imagenet.pth@sha256:")


def _bad_file(kind: str, folder) -> str:
    path = folder / f"{kind}.pth"
    if kind == "jpeg":
        path.write_bytes(needs(DATA / "corel1k" / "images" / "0.jpg").read_bytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(needs(MODELS / "mobilenet_v2_imagenet.pth").read_bytes()[:1_000_000])
    else:
        path.write_text("hello\n")
    return str(path)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("jpeg", "it is an image"),
        ("empty", "the file is empty"),
        ("truncated", "the zip archive is truncated or corrupt"),
        ("text", "not a PyTorch state_dict"),
    ],
)
@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_unreadable_weights_file_names_setting_file_and_reason(kind, reason, library, tmp_path):
    weights = _bad_file(kind, tmp_path)
    cfg = _cfg(weights=weights) if library == "torchvision" else _timm_cfg(weights=weights)
    with pytest.raises(WeightsError) as err:
        build_embedder(cfg, MODELS, tmp_path)
    message = str(err.value)
    assert f"embedder.weights={weights}: cannot read {weights}: {reason}" in message
    assert len(message) < 400, message


@pytest.mark.parametrize(
    ("library", "file", "other"),
    [
        ("torchvision", "timm_mobilenetv2_100_imagenet.pth", "embedder=timm"),
        ("timm", "mobilenet_v2_imagenet.pth", "embedder=torchvision"),
    ],
)
def test_weights_file_of_the_other_library(library, file, other, tmp_path):
    weights = str(needs(MODELS / file))
    cfg = _cfg(weights=weights) if library == "torchvision" else _timm_cfg(weights=weights)
    with pytest.raises(WeightsError) as err:
        build_embedder(cfg, MODELS, tmp_path)
    message = str(err.value)
    assert f"embedder.weights={weights}: {weights} does not fit" in message
    assert "keys missing (e.g. " in message and "unexpected (e.g. " in message
    assert other in message
    assert len(message) < 600, message


def test_torchvision_download_on_a_silent_network_times_out(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers: the download must give up."""
    import torchvision

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # the kernel accepts connections; nobody ever reads or answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/mobilenet_v2-b0353104.pth"
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "url", property(lambda self: url))
    monkeypatch.setattr(embed, "DOWNLOAD_TIMEOUT_S", 0.5)
    before = socket.getdefaulttimeout()
    outcome = []
    worker = threading.Thread(
        target=lambda: outcome.append(_raised(_cfg(), tmp_path / "empty", tmp_path)), daemon=True
    )
    try:
        worker.start()
        worker.join(timeout=20)
    finally:
        silent.close()
    assert not worker.is_alive(), "the download hung"
    assert isinstance(outcome[0], WeightsError), outcome
    assert "VISUAL_SEARCH_MODELS" in str(outcome[0]) and "timed out" in str(outcome[0])
    assert socket.getdefaulttimeout() == before


def _raised(cfg, models_dir, cache_dir) -> Exception | None:
    try:
        build_embedder(cfg, models_dir, cache_dir)
    except Exception as err:  # noqa: BLE001 -- handed to the test thread
        return err
    return None


def test_timm_download_runs_under_the_socket_timeout(tmp_path, monkeypatch):
    import timm

    seen = []

    def silent_hub(name, pretrained=False, **kwargs):
        seen.append((name, pretrained, socket.getdefaulttimeout()))
        raise TimeoutError("timed out")

    monkeypatch.setattr(timm, "create_model", silent_hub)
    before = socket.getdefaulttimeout()
    with pytest.raises(WeightsError, match=r"VISUAL_SEARCH_MODELS.*timed out"):
        build_embedder(_timm_cfg(), tmp_path / "empty", tmp_path)
    assert seen == [("mobilenetv2_100.ra_in1k", True, embed.DOWNLOAD_TIMEOUT_S)]
    assert socket.getdefaulttimeout() == before


@pytest.mark.parametrize("threads", [-1, 0])
def test_threads_below_one_name_the_setting(threads, tmp_path):
    with pytest.raises(ValueError, match=rf"embedder.threads must be >= 1.*got {threads}"):
        build_embedder(_cfg(threads=threads), MODELS, tmp_path)
