"""Embedders: a CNN backbone up to its global-average pool, with the preprocessing of its weights.

Two libraries provide MobileNetV2: torchvision (`embedder=torchvision`) and timm
(`embedder=timm`). Either runs in PyTorch or, by default when it is installed, in ONNX Runtime
from an export of the same torch model (`embedder.backend`); the torch model is always loaded,
for Grad-CAM. `embedder.weights` is either a published weights name or a path to a state_dict
file. A name is loaded from the file `embedder.local_files` maps it to in `paths.models` when
that file exists, and is otherwise downloaded from the library's published URL. Preprocessing
always comes from the published weights' metadata and is the same for queries and database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from visual_search import runtime
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
    """A model that maps a batch of preprocessed images to (n, d) L2-normalised embeddings.

    Attributes:
        model: the eval-mode torch backbone; ``model(x)`` gives (n, d) pooled features for x of
            shape (n, 3, H, W). Grad-CAM uses it whatever the backend.
        transform: PIL RGB image -> (3, H, W) float tensor, from the weights' metadata.
        description: everything that changes an embedding (library, arch, weights sha256,
            preprocessing, runtime and its version); part of every cache key.
        channels_last: torch backend: run convolutions in NHWC layout (several times faster).
        session: an ONNX Runtime session computing the same function, or None for torch.
        workers: batches `embed_files` decodes and embeds at once, each in its own thread.
        threads: intra-op threads of one model call (the session's, or torch's during
            `embed_files`).
    """

    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    description: dict[str, Any]
    channels_last: bool = True
    session: Any = None
    workers: int = 1
    threads: int = 1
    # With a session whose graph scales and normalises pixels itself: the transform's resize
    # and crop alone, giving the uint8 (H, W, 3) array the graph takes.
    geometry: Callable[[Image.Image], Image.Image] | None = None
    dim: int = field(init=False)

    def __post_init__(self):
        if self.channels_last and self.session is None:
            self.model = self.model.to(memory_format=torch.channels_last)
        probe = self.prepare(Image.new("RGB", (256, 256)))
        self.dim = int(self.forward(_stack([probe])).shape[1])

    def prepare(self, image: Image.Image) -> torch.Tensor | np.ndarray:
        """One decoded RGB image -> the model input this backend takes."""
        if self.geometry is not None:
            return np.asarray(self.geometry(image), dtype=np.uint8)
        return self.transform(image)

    @property
    def backend(self) -> str:
        return "torch" if self.session is None else "onnxruntime"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of a preprocessed image."""
        return tuple(self.transform(Image.new("RGB", (256, 256))).shape)

    def forward(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """A batch of `prepare`d images -> (n, d) float32 L2-normalised embeddings."""
        if self.session is not None:
            return self.session.run(None, {"images": np.asarray(batch)})[0]
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return nn.functional.normalize(self.model(batch).float(), dim=1).numpy()

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor | np.ndarray:
        """Decoded RGB images -> one model input batch."""
        return _stack([self.prepare(im) for im in images])

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed already-decoded RGB images (e.g. an upload), in one batch."""
        return self.forward(self.batch(images))


def _stack(items: Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor | np.ndarray:
    return np.stack(items) if isinstance(items[0], np.ndarray) else torch.stack(items)


def split_transform(transform) -> tuple[Callable, list[float], list[float]] | None:
    """(resize-and-crop, mean, std) of a classification transform whose remaining steps are
    exactly: to a [0, 1] tensor, then normalise by mean and std; None for anything else.

    An ONNX graph that takes uint8 pixels does those last steps itself, faster than torch does
    them image by image.
    """
    from torchvision.transforms import CenterCrop, Compose, Normalize, Resize
    from torchvision.transforms import functional as F
    from torchvision.transforms._presets import ImageClassification

    if type(transform) is ImageClassification:
        t = transform

        def geometry(image: Image.Image) -> Image.Image:
            image = F.resize(image, t.resize_size, interpolation=t.interpolation,
                             antialias=t.antialias)  # fmt: skip
            return F.center_crop(image, t.crop_size)

        return geometry, list(t.mean), list(t.std)
    if isinstance(transform, Compose):
        steps = transform.transforms
        names = [type(step).__name__ for step in steps]
        tail = len(steps) >= 2 and names[-2] in ("ToTensor", "MaybeToTensor")
        tail = tail and isinstance(steps[-1], Normalize)
        if tail and all(isinstance(step, (Resize, CenterCrop)) for step in steps[:-2]):
            normalise = steps[-1]
            return (
                Compose(steps[:-2]),
                torch.as_tensor(normalise.mean).tolist(),
                torch.as_tensor(normalise.std).tolist(),
            )
    return None


def build_embedder(cfg, models_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> Embedder:
    """Load the backbone an `embedder` config names, with its weights and preprocessing, on the
    runtime `embedder.backend` resolves to."""
    for name in ("threads", "workers"):
        value = cfg[name]
        if value is not None and (isinstance(value, bool) or value < (name == "threads")):
            raise ValueError(
                f"embedder.{name} must be >= {int(name == 'threads')}, or null to size it to "
                f"the machine, got {value!r}; set embedder.{name}"
            )
    backend = runtime.resolve(cfg.backend, "embedder.backend")
    workers, threads = parallelism(cfg.workers, cfg.threads)
    models_dir, cache_dir = Path(models_dir).expanduser(), Path(cache_dir).expanduser()
    if cfg.library == "torchvision":
        model, transform, weights_id = _torchvision(cfg, models_dir, cache_dir)
    elif cfg.library == "timm":
        model, transform, weights_id = _timm(cfg, models_dir, cache_dir)
    else:
        raise ValueError(f"embedder.library must be torchvision or timm, got {cfg.library!r}")
    model.eval()
    description = {
        "backend": cfg.library,  # the key keeps its old name so existing caches stay valid
        "arch": cfg.arch,
        "weights": weights_id,
        "preprocess": repr(transform),
        "torch": torch.__version__,
        "output": "l2-normalised",
    }
    session = geometry = None
    if backend == "onnxruntime":
        split = split_transform(transform)
        probe = Image.new("RGB", (256, 256))
        if split is not None:
            geometry, mean, std = split
            w, h = geometry(probe).size
            spec = runtime.InputSpec((h, w, 3), "uint8", mean, std)
        else:
            spec = runtime.InputSpec(tuple(transform(probe).shape), "float32")
        identity = {k: description[k] for k in ("backend", "arch", "weights", "preprocess")}
        session = _onnx_session(model, spec, identity, cache_dir, cfg, threads)
        description["runtime"] = f"onnxruntime {runtime.version('onnxruntime')}"
    log.info(
        "embedder %s/%s on %s, weights %s", cfg.library, cfg.arch, backend, weights_id
    )  # fmt: skip
    log.info("preprocessing: %s", " ".join(repr(transform).split()))
    return Embedder(
        model, transform, description, cfg.channels_last, session, workers, threads, geometry
    )  # fmt: skip


def parallelism(workers: int | None, threads: int | None) -> tuple[int, int]:
    """(workers, intra-op threads per worker) for `embed_files`; None sizes each to the machine:
    min(cores, 4) workers (0 means decode and embed in turn in the caller's thread), and the
    cores shared out among them."""
    cores = os.cpu_count() or 1
    workers = min(cores, 4) if workers is None else workers
    threads = threads or max(1, cores // max(workers, 1))
    return workers, threads


def _onnx_session(model: nn.Module, spec, identity, cache_dir: Path, cfg, threads: int):
    """The cached export's session; an unreadable cached file is exported again, once."""
    path = runtime.export_embedder(model, spec, identity, cache_dir, cfg.onnx_opset)
    try:
        return runtime.session(path, threads)
    except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own untyped errors
        log.warning("cached ONNX export %s is unreadable (%s); exporting again", path, err)
        path.unlink(missing_ok=True)
        path = runtime.export_embedder(model, spec, identity, cache_dir, cfg.onnx_opset)
        return runtime.session(path, threads)


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
    other = "timm" if cfg.library == "torchvision" else "torchvision"
    if missing or unexpected:
        raise WeightsError(
            f"embedder.weights={cfg.weights}: {source} does not fit {cfg.library}/{cfg.arch}: "
            f"{len(missing)} keys missing (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'}); the file "
            f"may be for the other library (embedder={other}) or another embedder.arch"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise WeightsError(
            f"embedder.weights={cfg.weights}: {source} does not fit {cfg.library}/{cfg.arch}: "
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

    def __init__(self, paths: Sequence[Path], prepare, settings: DecodeSettings, boxes=None):
        self.paths, self.prepare, self.settings = list(paths), prepare, settings
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.paths[i], self.settings)
            if self.boxes[i] is not None:
                image = image.crop(tuple(self.boxes[i]))
            return i, self.prepare(image), None
        except DecodeError as err:
            return i, None, err.reason


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    tensor = _stack([x for _, x in good]) if good else None
    return [i for i, _ in good], tensor, bad


def embed_files(
    embedder: Embedder,
    paths: Sequence[Path],
    settings: DecodeSettings,
    batch_size: int = 8,
    workers: int | None = None,
    boxes: Sequence[tuple[int, int, int, int] | None] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode and embed files in batches, several batches at once.

    Each of `workers` threads (None: the embedder's own) decodes a batch and runs the model on
    it; decoding, resizing and both runtimes' model calls release the GIL, so one worker
    decodes while another's model runs. With 0 workers everything runs in turn in this thread.
    `boxes` crops each decoded image (x0, y0, x1, y1 in pixels of the upright image) before
    preprocessing; None keeps it whole.

    Returns:
        (n, d) float32 embeddings in input order (rows of skipped files are zero), and
        {index: reason} for every file that could not be decoded.
    """
    workers = embedder.workers if workers is None else workers
    out = np.zeros((len(paths), embedder.dim), dtype=np.float32)
    skipped: dict[int, str] = {}
    files = _ImageFiles(paths, embedder.prepare, settings, boxes)

    def work(chunk: range):
        indices, batch, bad = _collate([files[i] for i in chunk])
        return indices, (embedder.forward(batch) if batch is not None else None), bad

    chunks = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    start = time.perf_counter()
    with _torch_threads(embedder), tqdm(total=len(paths), unit="img", desc="embed",
                                        disable=None) as bar:  # fmt: skip
        for indices, vectors, bad in _in_order(work, chunks, workers):
            for i, reason in bad:
                skipped[i] = reason
                log.warning("skipped %s: %s", paths[i], reason)
            if vectors is not None:
                out[indices] = vectors
            bar.update(len(indices) + len(bad))
    elapsed = time.perf_counter() - start
    log.info(
        "embedded %d images in %.1f s (%.1f images/s; %s, batch %d, %d workers x %d threads)",
        len(paths) - len(skipped), elapsed, len(paths) / max(elapsed, 1e-9), embedder.backend,
        batch_size, workers, embedder.threads,
    )  # fmt: skip
    return out, skipped


@contextmanager
def _torch_threads(embedder: Embedder) -> Iterator[None]:
    """Torch's thread count is process-wide: give each worker's model call its share while
    `embed_files` runs, and restore it after."""
    previous = torch.get_num_threads()
    if embedder.session is None:
        torch.set_num_threads(embedder.threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _in_order(fn, items: Sequence, workers: int) -> Iterator:
    """fn over items, results in order, at most 2 x workers items in flight at once."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="embed") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
