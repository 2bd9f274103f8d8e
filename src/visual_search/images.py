"""Decode one image file into an upright 8-bit RGB image, or say why it cannot be used.

Every path that reads pixels (database indexing, queries, the web app's uploads) goes through
:func:`load_rgb`, so query and database images are decoded identically. A file that cannot be
used raises :class:`DecodeError` with a short reason; callers skip it and log the reason.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError, features

logger = logging.getLogger(__name__)

# What the OS and Pillow raise for a file that is not a usable image; anything else is a bug.
# OSError covers UnidentifiedImageError and "image file is truncated".
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

# ISO-BMFF brands of HEIF-family files; the HEVC ones only pillow-heif can decode.
_HEVC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm"})
_HEIF_BRANDS = _HEVC_BRANDS | {b"mif1", b"msf1", b"avif"}
_HEADER_BYTES = 64

# Guards the process-wide switches (warning filters, LOAD_TRUNCATED_IMAGES) we flip briefly.
_PILLOW_GLOBALS = threading.Lock()


class DecodeError(Exception):
    """The file cannot be used as an image.

    Attributes:
        path: The file's path, or the stream's name (``"<stream>"`` when it has none).
        reason: Short human text, e.g. ``"empty file"``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str]]:
        # DataLoader workers pickle exceptions; the default would call __init__ with one argument.
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class DecodeSettings:
    """How :func:`load_rgb` decodes (config group ``decode``).

    Attributes:
        background: RGB colour that transparent pixels are composited on.
        max_pixels: Images with more pixels (width * height) are refused before decoding, as
            decompression bombs. Pillow's own ``Image.MAX_IMAGE_PIXELS`` refuses as well, so the
            effective limit is the smaller of the two.
        max_aspect_ratio: Images longer than this many times their width (or the reverse) are
            refused: preprocessing scales the short side up to the model's size, so a 100000 x 1
            strip of a few bytes would become gigabytes of pixels.
    """

    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 89_478_485
    max_aspect_ratio: float = 50.0

    def __post_init__(self) -> None:
        # Hydra hands lists over; freeze them so settings stay hashable.
        object.__setattr__(self, "background", tuple(self.background))
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"decode.background must be 3 ints in 0..255, got {self.background}")
        if self.max_pixels < 1:
            raise ValueError(f"decode.max_pixels must be positive, got {self.max_pixels}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"decode.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")


def _pillow_open(fp: IO[bytes]) -> Image.Image:
    """Pillow's own ``Image.open``.

    Importing ultralytics replaces ``Image.open`` process-wide with a wrapper that, on a file
    Pillow cannot identify, imports (or pip-installs) a HEIF plugin; without the plugin a
    ModuleNotFoundError escapes in place of Pillow's error, so a text file named .jpg would
    crash a run instead of being skipped. The wrapper keeps the original as ``_image_open``.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    return (getattr(patches, "_image_open", None) or Image.open)(fp)


def is_heif_without_decoder(header: bytes) -> bool:
    """Whether ``header`` (a file's first bytes) starts a HEIF/HEIC/AVIF file nothing can decode.

    The web app answers 415 for these rather than 400: the file is an image, just not one this
    installation reads. Installing pillow-heif (and registering its opener) decodes all of them.
    """
    if len(header) < 12 or header[4:8] != b"ftyp":
        return False
    box_end = min(len(header), max(12, int.from_bytes(header[:4], "big")))
    brands = {header[8:12]} | {header[i : i + 4] for i in range(16, box_end - 3, 4)}
    if not brands & _HEIF_BRANDS:
        return False
    Image.init()
    if "HEIF" in Image.OPEN:  # pillow-heif's opener
        return False
    if brands & _HEVC_BRANDS:
        return True
    return not features.check("avif")


def load_rgb(
    path: str | os.PathLike[str] | IO[bytes], settings: DecodeSettings = DecodeSettings()
) -> Image.Image:
    """Fully decode one image (first frame) into a new, upright, 8-bit RGB image.

    Args:
        path: A file path, or a binary file object such as an upload's stream (left open).
        settings: Background for transparency and the pixel limit.

    Raises:
        DecodeError: Missing or unreadable path, empty file, unknown format, HEIF without a
            plugin, decompression bomb, truncated or corrupt data. Callers log the reason.
    """
    is_path = isinstance(path, str | os.PathLike)
    name = os.fspath(path) if is_path else str(getattr(path, "name", "<stream>"))
    try:
        if is_path:
            with open(path, "rb") as fp:
                return _decode(fp, name, settings)
        return _decode(path, name, settings)
    except (*_DECODE_ERRORS, *_BOMB_ERRORS) as exc:
        # OS errors read best as their strerror ("Permission denied"), Pillow's as their message.
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DecodeError(name, reason) from exc


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert a decoded image of any Pillow mode into a new 8-bit RGB image.

    Transparent pixels (alpha bands, palettes with tRNS, a ``transparency`` key) are composited
    over ``background``. CMYK goes through its embedded ICC profile to sRGB when it has one.
    16-bit data (``I;16*``, and ``I`` whose values fit 0..65535) is divided by 257 and rounded;
    other ``I`` and ``F`` data have no fixed white, so they are min-max stretched per image. EXIF
    orientation is left alone: :func:`load_rgb` applies it first.

    Raises:
        ValueError: The mode has no conversion to RGB.
    """
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # NOTE: a transparency key here (tRNS in a 16-bit grey PNG, rare) is ignored.
        return _high_depth_to_rgb(image)
    if image.mode == "La":
        image = image.convert("LA")  # Pillow un-premultiplies La only towards LA
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(fp: IO[bytes], name: str, settings: DecodeSettings) -> Image.Image:
    """Check the header, open, refuse bombs, decode every pixel, turn upright, convert."""
    if not (getattr(fp, "seekable", None) and fp.seekable()):
        fp = io.BytesIO(fp.read())  # Pillow and the header peek both need to seek
    start = fp.tell()
    header = fp.read(_HEADER_BYTES)
    fp.seek(start)
    if not header:
        raise DecodeError(name, "empty file")
    if is_heif_without_decoder(header):
        raise DecodeError(name, "HEIF/HEIC/AVIF image needs the pillow-heif plugin to decode")

    # Pillow only warns between its limit and twice it; make that warning a refusal too.
    with _PILLOW_GLOBALS, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = _pillow_open(fp)
        except UnidentifiedImageError as exc:
            raise DecodeError(name, "not a recognised image format") from exc
        except _BOMB_ERRORS as exc:
            reason = f"{exc} (Pillow's Image.MAX_IMAGE_PIXELS, which caps decode.max_pixels)"
            raise DecodeError(name, reason) from exc

    with image:
        width, height = image.size
        if width * height > settings.max_pixels:
            raise DecodeError(
                name,
                f"{width}x{height} = {width * height} pixels exceeds the limit of "
                f"{settings.max_pixels}; raise decode.max_pixels if the file is trusted",
            )
        if max(width, height) > settings.max_aspect_ratio * max(1, min(width, height)):
            raise DecodeError(
                name,
                f"{width}x{height} is more than {settings.max_aspect_ratio:g} times longer than "
                "wide; raise decode.max_aspect_ratio if such strips are meant to be embedded",
            )
        _load_strictly(image)
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image, settings.background)


def _load_strictly(image: Image.Image) -> None:
    """Decode all pixels so truncated data fails here, even if someone allowed truncation."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        image.load()
        return
    # NOTE: another library set this process-wide flag; we switch it off only while we decode.
    # Code that reads the flag without our lock can still see it off for that moment.
    with _PILLOW_GLOBALS:
        allowed = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = allowed


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile, else Pillow's naive inversion."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            logger.warning("unusable CMYK ICC profile (%s); converting without it", exc)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images to 8-bit grey RGB, without clipping."""
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    if image.mode != "F" and low >= 0 and high <= 65535:
        # /257 maps 65535 to exactly 255, so 16-bit white stays white and nothing saturates.
        scaled = values / 257.0
    else:
        logger.debug("min-max stretching %s image from [%s, %s]", image.mode, low, high)
        values = np.where(np.isfinite(values), values, low)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")
