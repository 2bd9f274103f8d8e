"""Tests for visual_search.images: the shared fault cases plus small generated files per kind."""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, features

from visual_search.images import (
    DecodeError,
    DecodeSettings,
    is_heif_without_decoder,
    load_rgb,
    to_rgb,
)

from .conftest import CASES, needs


def _case(name: str) -> Path:
    folder = CASES / name
    if not folder.is_dir():
        needs(folder)
    return folder


def _save(image: Image.Image, path: Path, **params: object) -> Path:
    image.save(path, **params)
    return path


def _reason(path: object, settings: DecodeSettings | None = None) -> str:
    with pytest.raises(DecodeError) as caught:
        load_rgb(path, settings or DecodeSettings())
    return caught.value.reason


def _pixels(image: Image.Image) -> list[tuple[int, ...]]:
    """Pixels in row-major order, as tuples (Pillow 14 drops getdata)."""
    flat = np.asarray(image).reshape(image.width * image.height, -1)
    return [tuple(int(v) for v in pixel) for pixel in flat]


def _png_header_only(width: int, height: int) -> bytes:
    """A structurally valid RGB PNG declaring width x height but carrying no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


# Real examples from ../shared/cases


def test_exif_orientation_is_applied():
    folder = _case("case01_exif_orientation")
    stored = folder / "orientation6_64x32_stored.jpg"
    with Image.open(stored) as raw:
        assert raw.size == (64, 32)  # the case only tests something if Pillow leaves it sideways

    image = load_rgb(stored)
    reference = np.asarray(Image.open(folder / "upright_reference_32x64.png").convert("RGB"))
    assert image.mode == "RGB" and image.size == (32, 64)
    error = np.abs(np.asarray(image, dtype=np.int16) - reference)
    assert error.mean() < 4 and error.max() < 64  # JPEG error, not a rotated band


def test_palette_transparency_is_composited_without_warning():
    path = _case("case03_palette_png_transparency") / "palette_trns_9x9.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_rgb(path)

    assert image.getpixel((1, 4)) == (255, 255, 255)
    assert np.allclose(image.getpixel((4, 4)), (127, 127, 255), atol=1)
    assert image.getpixel((7, 4)) == (255, 0, 0)


def test_truncated_jpeg_fails_and_intact_loads():
    folder = _case("case04_truncated_jpeg")
    assert load_rgb(folder / "intact_128x128.jpg").size == (128, 128)
    assert "truncated" in _reason(folder / "truncated_60pct_128x128.jpg")


def test_truncated_jpeg_fails_even_if_truncation_was_allowed_globally(monkeypatch):
    folder = _case("case04_truncated_jpeg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "truncated" in _reason(folder / "truncated_60pct_128x128.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


@pytest.mark.parametrize(
    ("name", "reason", "heif"),
    [
        ("zero_bytes.jpg", "empty file", False),
        ("plain_text_named.jpeg", "not a recognised image format", False),
        ("svg_text_named.png", "not a recognised image format", False),
        ("heif_brand_named.jpg", "pillow-heif", True),
    ],
)
def test_not_an_image(name, reason, heif):
    path = _case("case06_not_an_image") / name
    assert reason in _reason(path)
    assert is_heif_without_decoder(path.read_bytes()[:64]) is heif


# Modes, on generated files


def test_grayscale_and_bilevel(tmp_path):
    gray = _save(Image.new("L", (4, 4), 77), tmp_path / "gray.png")
    assert set(_pixels(load_rgb(gray))) == {(77, 77, 77)}

    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    image = load_rgb(_save(bilevel, tmp_path / "bilevel.png"))
    assert _pixels(image) == [(0, 0, 0), (255, 255, 255)]


def test_cmyk_jpeg_without_profile(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    with Image.open(path) as raw:
        assert raw.mode == "CMYK" and "icc_profile" not in raw.info
    assert np.allclose(load_rgb(path).getpixel((4, 4)), (255, 0, 0), atol=2)


def test_cmyk_jpeg_with_unusable_profile_falls_back(tmp_path, caplog):
    # Only an sRGB profile can be created here (lcms makes no CMYK one); it does not fit CMYK data.
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = _save(
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", icc_profile=srgb
    )
    with caplog.at_level(logging.WARNING, logger="visual_search.images"):
        image = load_rgb(path)
    assert np.allclose(image.getpixel((4, 4)), (255, 0, 0), atol=2)
    assert "ICC profile" in caplog.text


def test_cmyk_profile_is_used_when_present(monkeypatch):
    calls = []

    def fake_transform(image, source, target, outputMode):
        calls.append((source, target, outputMode))
        return Image.new("RGB", image.size, (1, 2, 3))

    monkeypatch.setattr(ImageCms, "ImageCmsProfile", lambda fp: ("profile", fp.read()))
    monkeypatch.setattr(ImageCms, "profileToProfile", fake_transform)
    cmyk = Image.new("CMYK", (2, 2))
    cmyk.info["icc_profile"] = b"embedded"
    assert to_rgb(cmyk).getpixel((0, 0)) == (1, 2, 3)
    assert calls[0][0] == ("profile", b"embedded") and calls[0][2] == "RGB"


def test_palette_without_and_with_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    plain = _save(palette, tmp_path / "plain.png")
    assert _pixels(load_rgb(plain)) == [(255, 0, 0), (0, 0, 255)]

    keyed = _save(palette, tmp_path / "keyed.gif", transparency=0)
    image = load_rgb(keyed, DecodeSettings(background=(10, 20, 30)))
    assert _pixels(image) == [(10, 20, 30), (0, 0, 255)]


def test_la_is_composited(tmp_path):
    la = Image.new("LA", (3, 1))
    for x, alpha in enumerate((0, 255, 128)):
        la.putpixel((x, 0), (200, alpha))
    image = load_rgb(_save(la, tmp_path / "la.png"), DecodeSettings(background=(10, 20, 30)))
    transparent, opaque, half = _pixels(image)
    assert transparent == (10, 20, 30) and opaque == (200, 200, 200)
    assert np.allclose(half, (105, 110, 115), atol=1)


@pytest.mark.parametrize(
    ("background", "half_red"), [((255, 255, 255), (255, 127, 127)), ((0, 0, 0), (128, 0, 0))]
)
def test_rgba_is_composited(tmp_path, background, half_red):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 255, 0, 0), (0, 0, 255, 255), (255, 0, 0, 128)])
    image = load_rgb(_save(rgba, tmp_path / "rgba.png"), DecodeSettings(background=background))
    transparent, opaque, half = _pixels(image)
    assert transparent == background and opaque == (0, 0, 255)
    assert np.allclose(half, half_red, atol=1)


def test_rgb_with_transparency_key(tmp_path):
    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (9, 9, 9))
    path = _save(rgb, tmp_path / "keyed.png", transparency=(1, 2, 3))
    image = load_rgb(path, DecodeSettings(background=(0, 0, 0)))
    assert _pixels(image) == [(0, 0, 0), (9, 9, 9)]


def test_16bit_gradient_is_rescaled_not_clipped(tmp_path):
    gradient = np.linspace(0, 65535, 257).round().astype(np.uint16).reshape(1, 257)
    path = _save(Image.fromarray(np.repeat(gradient, 8, axis=0)), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")

    gray = np.asarray(load_rgb(path))[0, :, 0]
    assert gray.min() == 0 and gray.max() == 255
    assert abs(int(gray[128]) - 128) <= 1
    assert np.array_equal(gray, np.rint(gradient[0] / 257))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_16bit_modes(mode):
    values = np.array([[0, 257, 32896, 65535]])
    if mode == "I":
        image = Image.fromarray(values.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    assert [pixel[0] for pixel in _pixels(to_rgb(image))] == [0, 1, 128, 255]


def test_wide_int_and_float_are_min_max_stretched(tmp_path):
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert [p[0] for p in _pixels(to_rgb(wide))] == [0, 128, 255]

    floats = Image.fromarray(np.array([[-1.0, 1.0, 3.0]], dtype=np.float32))
    image = load_rgb(_save(floats, tmp_path / "float.tif"))
    assert _pixels(image) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]

    flat = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert set(_pixels(to_rgb(flat))) == {(0, 0, 0)}


@pytest.mark.parametrize(
    ("mode", "stored", "expected"),
    [
        ("YCbCr", (76, 85, 255), (254, 0, 0)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("LAB", (255, 128, 128), (254, 255, 254)),
    ],
)
def test_other_colour_spaces_convert(mode, stored, expected):
    image = to_rgb(Image.new(mode, (2, 2), stored))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == expected


def test_multi_frame_gif_gives_first_frame(tmp_path):
    frames = [
        Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))
    ]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    assert load_rgb(path).getpixel((0, 0)) == (255, 0, 0)


# Faults, on generated files


def test_generated_truncated_jpeg(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(noise).save(data, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    assert "truncated" in _reason(path)


def test_size_limit_refuses_before_decoding(tmp_path):
    # No pixel data at all: a refusal about size proves pixels were never decoded.
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(300, 200))
    reason = _reason(path, DecodeSettings(max_pixels=1000))
    assert "300x200" in reason and "60000" in reason
    assert "1000" in reason and "decode.max_pixels" in reason


def test_huge_declared_png_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))
    assert "10000000000" in _reason(path)


def test_pillow_bomb_warning_becomes_refusal(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (40, 40)), tmp_path / "warn.png")  # 1600 px: warning zone
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason = _reason(path)
    assert "1600" in reason and "MAX_IMAGE_PIXELS" in reason


# Inputs


def test_file_object_input_stays_open(tmp_path):
    data = io.BytesIO()
    Image.new("RGB", (3, 2), (5, 6, 7)).save(data, "PNG")
    data.seek(0)
    image = load_rgb(data)
    assert image.size == (3, 2) and image.getpixel((0, 0)) == (5, 6, 7)
    assert not data.closed


def test_unseekable_stream_input():
    data = io.BytesIO()
    Image.new("L", (2, 2), 9).save(data, "PNG")

    class Unseekable(io.RawIOBase):
        def __init__(self, payload: bytes) -> None:
            self._payload = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            chunk = self._payload.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    assert load_rgb(Unseekable(data.getvalue())).getpixel((0, 0)) == (9, 9, 9)


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(DecodeError) as caught:
        load_rgb(missing)
    assert caught.value.path == str(missing) and "No such file" in caught.value.reason
    assert "directory" in _reason(tmp_path).lower()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_path(tmp_path):
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "locked.png")
    path.chmod(0)
    assert "Permission denied" in _reason(path)


# API details


def test_decode_error_survives_pickling():
    error = pickle.loads(pickle.dumps(DecodeError("a.jpg", "empty file")))
    assert (error.path, error.reason, str(error)) == ("a.jpg", "empty file", "a.jpg: empty file")


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [({"background": (0, 0, 300)}, "decode.background"), ({"max_pixels": 0}, "decode.max_pixels")],
)
def test_bad_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        DecodeSettings(**kwargs)


def test_heif_detection_reads_compatible_brands():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = b"ftyp" + major + b"\0\0\0\0" + b"".join(compatible)
        return struct.pack(">I", 4 + len(body)) + body

    assert is_heif_without_decoder(ftyp(b"mif1", b"mif1", b"heic"))
    assert is_heif_without_decoder(ftyp(b"avif", b"mif1")) is not features.check("avif")
    assert not is_heif_without_decoder(ftyp(b"isom", b"mp41"))  # an MP4 video, not HEIF
    assert not is_heif_without_decoder(b"\x89PNG\r\n\x1a\n")


def test_extreme_strips_are_refused_before_decoding(tmp_path):
    # 100000 x 1 pixels is under any pixel limit, but preprocessing scales the short side to
    # 256 px: 25.6 million x 256 pixels.
    path = _save(Image.new("L", (20_000, 1)), tmp_path / "strip.png")
    with pytest.raises(
        DecodeError, match=r"20000x1 is more than 50 times.*decode\.max_aspect_ratio"
    ):
        load_rgb(path)
    assert load_rgb(path, DecodeSettings(max_aspect_ratio=30_000)).size == (20_000, 1)


def test_a_non_image_is_skipped_even_after_ultralytics_patches_image_open(tmp_path):
    """ultralytics wraps Image.open to fetch a HEIF plugin on unknown files; without the plugin
    that wrapper raises ModuleNotFoundError, which must not escape the decoder."""
    import ultralytics.utils.patches  # noqa: F401 -- applies the patch, as the ROI stage does

    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(DecodeError, match="not a recognised image format"):
        load_rgb(path)
