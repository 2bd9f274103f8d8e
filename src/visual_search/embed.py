"""Embedders: a CNN backbone up to its global-average pool, with the preprocessing of its weights.

Two backends load MobileNetV2: torchvision (`embedder=torchvision`) and timm (`embedder=timm`).
Weights come from the local weights directory first (`paths.models` / `embedder.local_file`, or
`embedder.weights` as a file path), and are downloaded from the library's published URL only
when no local file exists. Preprocessing always comes from the published weights' metadata and
is the same object for queries and database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visual_search.images import DecodeError, DecodeSettings, load_rgb

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """Weights could not be found locally nor downloaded; the message names the setting."""


@dataclass
class Embedder:
    """A model that maps a batch of preprocessed images to (n, d) pooled embeddings.

    Attributes:
        model: eval-mode module; ``model(x)`` gives (n, d) for x of shape (n, 3, H, W).
        transform: PIL RGB image -> (3, H, W) float tensor, from the weights' metadata.
        description: everything that changes an embedding (backend, arch, weights sha256,
            preprocessing); part of every cache key.
        channels_last: run convolutions in NHWC layout (several times faster on CPU).
    """

    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    description: dict[str, Any]
    channels_last: bool = True
    dim: int = field(init=False)

    def __post_init__(self):
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            self.dim = int(self.forward(torch.zeros(1, 3, 224, 224)).shape[1])

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) preprocessed batch -> (n, d) float32 embeddings (not normalised)."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(batch).float().numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed already-decoded RGB images (e.g. an upload), in one batch."""
        return self.forward(torch.stack([self.transform(im) for im in images]))


def build_embedder(cfg, models_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> Embedder:
    """Load the backbone an `embedder` config names, with its weights and preprocessing."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models_dir, cache_dir = Path(models_dir).expanduser(), Path(cache_dir).expanduser()
    if cfg.backend == "torchvision":
        model, transform, weights_id = _torchvision(cfg, models_dir, cache_dir)
    elif cfg.backend == "timm":
        model, transform, weights_id = _timm(cfg, models_dir, cache_dir)
    else:
        raise ValueError(f"embedder.backend must be torchvision or timm, got {cfg.backend!r}")
    model.eval()
    description = {
        "backend": cfg.backend,
        "arch": cfg.arch,
        "weights": weights_id,
        "preprocess": repr(transform),
        "torch": torch.__version__,
    }
    log.info("embedder %s/%s, weights %s", cfg.backend, cfg.arch, weights_id)
    log.info("preprocessing: %s", " ".join(repr(transform).split()))
    return Embedder(model, transform, description, cfg.channels_last)


def _local_weights(cfg, models_dir: Path) -> Path | None:
    """The weights file to load, if one exists locally (explicit path first)."""
    explicit = Path(cfg.weights).expanduser()
    if explicit.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        for candidate in (explicit, models_dir / explicit):
            if candidate.is_file():
                return candidate
        raise WeightsError(
            f"embedder.weights={cfg.weights} is not a file (looked in the current directory and "
            f"in paths.models={models_dir})"
        )
    if cfg.local_file and (models_dir / cfg.local_file).is_file():
        return models_dir / cfg.local_file
    return None


def _file_id(path: Path) -> str:
    with open(path, "rb") as f:
        return f"{path.name}@sha256:{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"


def _download_failed(cfg, models_dir: Path, source: str, err: Exception) -> WeightsError:
    return WeightsError(
        f"no local weights for embedder.weights={cfg.weights} (looked for "
        f"{models_dir / (cfg.local_file or '?')}; set VISUAL_SEARCH_MODELS or "
        f"embedder.local_file) and downloading {source} failed: {err}"
    )


def _torchvision(cfg, models_dir: Path, cache_dir: Path):
    import torchvision

    model = torchvision.models.get_model(cfg.arch, weights=None)
    model.classifier = nn.Identity()  # keep the pooled 1280-d vector
    enum = torchvision.models.get_model_weights(cfg.arch)
    published_name = cfg.weights if cfg.weights in enum.__members__ else cfg.preprocess_from
    if published_name not in enum.__members__:
        raise WeightsError(
            f"embedder.weights={cfg.weights} is a file, so embedder.preprocess_from must name the "
            f"published {cfg.arch} weights whose preprocessing it expects "
            f"({', '.join(enum.__members__)}), got {cfg.preprocess_from!r}"
        )
    published = enum[published_name]
    local = _local_weights(cfg, models_dir)

    if local is not None:
        state = torch.load(local, map_location="cpu", weights_only=True)
        weights_id = _file_id(local)
    else:
        torch.hub.set_dir(str(cache_dir / "torch_hub"))
        try:
            state = published.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # noqa: BLE001 -- any download failure ends the same way
            raise _download_failed(cfg, models_dir, published.url, err) from err
        weights_id = published.url.rsplit("/", 1)[-1]
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=True)
    return model, published.transforms(), weights_id


def _timm(cfg, models_dir: Path, cache_dir: Path):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    local = _local_weights(cfg, models_dir)
    name = cfg.weights if local is None or not Path(cfg.weights).suffix else cfg.arch
    if local is not None:
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(torch.load(local, map_location="cpu", weights_only=True))
        weights_id = _file_id(local)
    else:
        os.environ.setdefault("HF_HOME", str(cache_dir / "huggingface"))
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:  # noqa: BLE001 -- any download failure ends the same way
            raise _download_failed(cfg, models_dir, f"timm/{name}", err) from err
        weights_id = name
    model.reset_classifier(0)  # pooled features, no logits
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    return model, transform, weights_id


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses one file per item; a bad file yields its reason instead."""

    def __init__(self, paths: Sequence[Path], transform, settings: DecodeSettings, boxes=None):
        self.paths, self.transform, self.settings = list(paths), transform, settings
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.paths[i], self.settings)
            if self.boxes[i] is not None:
                image = image.crop(tuple(self.boxes[i]))
            return i, self.transform(image), None
        except DecodeError as err:
            return i, None, err.reason


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    tensor = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], tensor, bad


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers must not compete with the model for cores


def default_workers() -> int:
    """Decoding processes for this machine.

    With two cores or fewer, a worker process only takes time from the model (measured: batch 8
    end to end at 70 images/s decoding in-process, 62 with one worker), so decoding stays in
    the main process; larger machines keep two cores for the model's threads.
    """
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores - 2)


def embed_files(
    embedder: Embedder,
    paths: Sequence[Path],
    settings: DecodeSettings,
    batch_size: int = 8,
    num_workers: int | None = None,
    boxes: Sequence[tuple[int, int, int, int] | None] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode and embed files in batches, decoding in DataLoader workers while the model runs
    (`num_workers`; None picks `default_workers()`). `boxes` crops each decoded image
    (x0, y0, x1, y1 in pixels of the upright image) before preprocessing; None keeps it whole.

    Returns:
        (n, d) float32 embeddings in input order (rows of skipped files are zero), and
        {index: reason} for every file that could not be decoded.
    """
    num_workers = default_workers() if num_workers is None else num_workers
    out = np.zeros((len(paths), embedder.dim), dtype=np.float32)
    skipped: dict[int, str] = {}
    loader = DataLoader(
        _ImageFiles(paths, embedder.transform, settings, boxes),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=False,
    )
    start = time.perf_counter()
    with tqdm(total=len(paths), unit="img", desc="embed", disable=None) as bar:
        for indices, batch, bad in loader:
            for i, reason in bad:
                skipped[i] = reason
                log.warning("skipped %s: %s", paths[i], reason)
            if batch is not None:
                out[indices] = embedder.forward(batch)
            bar.update(len(indices) + len(bad))
    elapsed = time.perf_counter() - start
    log.info(
        "embedded %d images in %.1f s (%.1f images/s, batch %d, %d workers, %d threads)",
        len(paths) - len(skipped), elapsed, len(paths) / max(elapsed, 1e-9), batch_size,
        num_workers, torch.get_num_threads(),
    )  # fmt: skip
    return out, skipped
