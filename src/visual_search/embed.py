"""Embedders: a CNN backbone up to its global-average pool, with the preprocessing of its weights.

Two backends load MobileNetV2: torchvision (`embedder=torchvision`) and timm (`embedder=timm`).
`embedder.weights` is either a published weights name or a path to a state_dict file. A name
is loaded from the file `embedder.local_files` maps it to in `paths.models` when that file
exists, and is otherwise downloaded from the library's published URL. Preprocessing always comes
from the published weights' metadata and is the same object for queries and database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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

# Seconds a weights download may wait on a silent socket before it fails.
DOWNLOAD_TIMEOUT_S = 60
# Suffixes that make a timm `embedder.weights` a path (timm names contain dots too).
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl", ".tar")


class WeightsError(ValueError):
    """Weights could not be resolved, read or downloaded; the message names the setting."""


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
    if cfg.threads is not None and (isinstance(cfg.threads, bool) or cfg.threads < 1):
        raise ValueError(
            f"embedder.threads must be >= 1, or null for all cores, got {cfg.threads!r}; "
            "set embedder.threads"
        )
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


def _named_file(cfg, name: str, models_dir: Path) -> Path | None:
    """The local file `embedder.local_files` maps the weights `name` to, if it exists."""
    file = (cfg.local_files or {}).get(name)
    if not file:
        return None
    path = models_dir / file
    if path.is_file():
        return path
    log.info("embedder.local_files: %s for %s not found, downloading instead", path, name)
    return None


def _weights_path(cfg, models_dir: Path, names: str) -> Path:
    """The file `embedder.weights` names, as given or inside paths.models."""
    given = Path(cfg.weights).expanduser()
    for candidate in (given, models_dir / given):
        if candidate.is_file():
            return candidate
    raise WeightsError(
        f"embedder.weights={cfg.weights!r} is not a file (looked in the current directory and "
        f"in paths.models={models_dir}) nor {names}; set embedder.weights to one of those "
        "names or to an existing state_dict file"
    )


def _file_id(path: Path) -> str:
    with open(path, "rb") as f:
        return f"{path.name}@sha256:{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"


def _unreadable(path: Path, err: Exception) -> str:
    """Why a weights file could not be read, in a few words."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as os_err:
        return f"{type(os_err).__name__}: {os_err.strerror}"
    if not head:
        return "the file is empty"
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG", b"GIF8")):
        return "it is an image, not a state_dict"
    if head.startswith(b"PK"):
        return "the zip archive is truncated or corrupt"
    if isinstance(err, (EOFError, pickle.UnpicklingError)):
        return f"not a PyTorch state_dict ({type(err).__name__})"
    first_line = (str(err).splitlines() or [""])[0]
    return f"not a PyTorch state_dict ({type(err).__name__}: {first_line[:100]})"


def _read_state(cfg, path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict file; any failure is a WeightsError naming the file and the reason."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- pickle, zip and I/O failures all end the same way
        raise WeightsError(
            f"embedder.weights={cfg.weights}: cannot read {path}: {_unreadable(path, err)}; "
            "point embedder.weights or embedder.local_files at a state_dict saved by torch.save"
        ) from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(
            f"embedder.weights={cfg.weights}: {path} holds a {type(state).__name__} that is not "
            "a state_dict of tensors; save model.state_dict() and point embedder.weights at it"
        )
    return state


def _load_into(cfg, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict, with a short WeightsError when the file does not fit the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    other = "timm" if cfg.backend == "torchvision" else "torchvision"
    if missing or unexpected:
        raise WeightsError(
            f"embedder.weights={cfg.weights}: {source} does not fit {cfg.backend}/{cfg.arch}: "
            f"{len(missing)} keys missing (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'}); the file "
            f"may be for the other backend (embedder={other}) or another embedder.arch"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise WeightsError(
            f"embedder.weights={cfg.weights}: {source} does not fit {cfg.backend}/{cfg.arch}: "
            f"{reason}; check embedder.arch"
        ) from err


@contextmanager
def _download_timeout() -> Iterator[None]:
    """Make a download on a silent network fail after DOWNLOAD_TIMEOUT_S instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_failed(cfg, name: str, models_dir: Path, source: str, err: Exception) -> WeightsError:
    mapped = (cfg.local_files or {}).get(name)
    looked = f"{models_dir / mapped} is absent" if mapped else "embedder.local_files has none"
    return WeightsError(
        f"no local weights for embedder.weights={cfg.weights} ({looked}; set "
        f"VISUAL_SEARCH_MODELS, or map {name} to a file in embedder.local_files) and "
        f"downloading {source} failed (socket timeout {DOWNLOAD_TIMEOUT_S} s): {err}"
    )


def _torchvision(cfg, models_dir: Path, cache_dir: Path):
    import torchvision

    model = torchvision.models.get_model(cfg.arch, weights=None)
    model.classifier = nn.Identity()  # keep the pooled 1280-d vector
    enum = torchvision.models.get_model_weights(cfg.arch)
    names = f"a torchvision weights name for {cfg.arch} ({', '.join(enum.__members__)})"

    # A name loads its own local file or its download; anything else is a file.
    if cfg.weights in enum.__members__:
        published = enum[cfg.weights]  # an alias (DEFAULT) resolves to the weights it stands for
        local = _named_file(cfg, published.name, models_dir)
    else:
        local = _weights_path(cfg, models_dir, names)
        if cfg.preprocess_from not in enum.__members__:
            raise WeightsError(
                f"embedder.weights={cfg.weights} is a file, so embedder.preprocess_from must name "
                f"the published {cfg.arch} weights whose preprocessing it expects "
                f"({', '.join(enum.__members__)}), got {cfg.preprocess_from!r}"
            )
        published = enum[cfg.preprocess_from]

    if local is not None:
        state, source, weights_id = _read_state(cfg, local), str(local), _file_id(local)
    else:
        torch.hub.set_dir(str(cache_dir / "torch_hub"))
        try:
            with _download_timeout():
                state = published.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # noqa: BLE001 -- any download failure ends the same way
            raise _download_failed(cfg, published.name, models_dir, published.url, err) from err
        source = weights_id = published.url.rsplit("/", 1)[-1]
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    _load_into(cfg, model, state, source)
    return model, published.transforms(), weights_id


def _timm_name(cfg) -> str:
    """The full timm pretrained name (arch.tag) `embedder.weights` gives, checked against arch."""
    import timm
    from timm.models import get_pretrained_cfg, is_model_pretrained, split_model_name_tag

    arch, tag = split_model_name_tag(cfg.weights)
    if not timm.is_model(arch) or not is_model_pretrained(cfg.weights):
        known = timm.list_models(cfg.arch, pretrained=True) if timm.is_model(cfg.arch) else []
        raise WeightsError(
            f"embedder.weights={cfg.weights!r} is neither a file path (it has no path separator "
            f"nor a suffix among {', '.join(WEIGHTS_SUFFIXES)}) nor a timm pretrained model "
            f"name; names for embedder.arch={cfg.arch}: {', '.join(known) or 'none'} "
            "(timm.list_models(pretrained=True) lists them all)"
        )
    if arch != cfg.arch:
        raise WeightsError(
            f"timm name {cfg.weights!r} has architecture {arch!r}, embedder.arch is "
            f"{cfg.arch!r}; set embedder.arch={arch} or choose embedder.weights among "
            f"{', '.join(timm.list_models(cfg.arch, pretrained=True)) or 'none'}"
        )
    return cfg.weights if tag else f"{arch}.{get_pretrained_cfg(arch).tag}"


def _timm(cfg, models_dir: Path, cache_dir: Path):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    # A value with a path separator or a file suffix is a file; anything else a timm name.
    weights = str(cfg.weights)
    if os.sep in weights or "/" in weights or Path(weights).suffix in WEIGHTS_SUFFIXES:
        known = ", ".join(timm.list_models(cfg.arch, pretrained=True)) or "none"
        names = f"a timm pretrained model name (for embedder.arch={cfg.arch}: {known})"
        name, local = cfg.arch, _weights_path(cfg, models_dir, names)
    else:
        name = _timm_name(cfg)
        local = _named_file(cfg, name, models_dir)

    if local is not None:
        model = timm.create_model(name, pretrained=False)
        _load_into(cfg, model, _read_state(cfg, local), str(local))
        weights_id = _file_id(local)
    else:
        os.environ.setdefault("HF_HOME", str(cache_dir / "huggingface"))
        try:
            with _download_timeout():
                model = timm.create_model(name, pretrained=True)
        except Exception as err:  # noqa: BLE001 -- any download failure ends the same way
            raise _download_failed(cfg, name, models_dir, f"timm/{name}", err) from err
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
