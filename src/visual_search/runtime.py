"""Inference runtimes: ONNX Runtime sessions for exports of the torch models, cached on disk.

An export is a pure function of the weights, the export settings and the versions of the
libraries that write it, so it is cached in ``paths.cache/exports`` under a key of exactly
those; a changed weights file, setting or library gives a new key and a fresh export. Exports
never go next to the weights, whose folder may be read-only or shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visual_search import cache

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")


class BackendError(ValueError):
    """A runtime was asked for that cannot run here; the message names the setting."""


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve(backend: str, setting: str) -> str:
    """`auto` -> the fastest installed runtime; an explicit choice is checked, not trusted."""
    if backend not in BACKENDS:
        raise BackendError(f"{setting} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "onnxruntime" if onnxruntime_installed() else "torch"
    if backend == "onnxruntime" and not onnxruntime_installed():
        raise BackendError(
            f"{setting}=onnxruntime, but onnxruntime is not installed in this environment "
            f"(`make setup` installs it); set {setting}=torch or auto"
        )
    return backend


def threads_for(threads: int | None) -> int:
    """Intra-op threads: the setting, or every core when it is None."""
    return threads or os.cpu_count() or 1


def session(path: Path, threads: int | None):
    """An ONNX Runtime CPU session with `threads` intra-op threads and no busy-waiting.

    Spinning is off: ORT's idle workers would otherwise spin between batches on the cores the
    decoding threads need.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads_for(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class InputSpec:
    """What an exported embedder takes per image.

    Either uint8 pixels (H, W, 3) that the graph scales to [0, 1] and normalises by `mean` and
    `std` itself, or float32 (3, H, W) already preprocessed (mean and std None).
    """

    shape: tuple[int, int, int]
    dtype: str
    mean: list[float] | None = None
    std: list[float] | None = None


class _Embedding(nn.Module):
    """Pixels -> normalised input -> pooled backbone -> L2 normalisation: the ONNX graph."""

    def __init__(self, backbone: nn.Module, spec: InputSpec):
        super().__init__()
        self.backbone, self.pixels = backbone, spec.mean is not None
        if self.pixels:
            self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixels:
            x = (x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        return nn.functional.normalize(self.backbone(x), dim=1)


def export_embedder(
    backbone: nn.Module, spec: InputSpec, identity: dict[str, Any], cache_dir: Path, opset: int
) -> Path:
    """The ONNX file of `backbone` with its input normalisation and L2 normalisation, with a
    dynamic batch dimension.

    Args:
        backbone: eval-mode module giving (n, d) pooled features.
        spec: the per-image input the graph takes.
        identity: what makes these weights these weights (library, arch, weights file hash,
            preprocessing).
        cache_dir: the cache root; the file goes under ``exports/embedder``.
        opset: ONNX opset to export to.
    """
    fields = {
        **identity,
        "input": [list(spec.shape), spec.dtype, spec.mean, spec.std],
        "opset": opset,
        "output": "l2-normalised",
        "torch": torch.__version__,
        "onnx": version("onnx"),
        "onnxscript": version("onnxscript"),
    }
    path = Path(cache_dir) / "exports" / "embedder" / f"{cache.key(fields)}.onnx"
    if path.is_file():
        return path
    log.info("exporting the embedder to ONNX (opset %d) at %s", opset, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _Embedding(backbone, spec).eval()
    example = torch.zeros(2, *spec.shape, dtype=getattr(torch, spec.dtype))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        out = Path(tmp) / "model.onnx"
        with torch.no_grad(), _quiet("onnx_ir", "onnxscript", "torch.onnx"):
            program = torch.onnx.export(
                model, (example,), input_names=["images"], output_names=["embeddings"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                opset_version=opset, dynamo=True, external_data=False, verbose=False,
            )  # fmt: skip
        program.save(str(out))
        cache.write_json(path.with_suffix(".json"), fields)
        os.replace(out, path)  # concurrent exporters each write whole files; last one wins
    return path


@contextlib.contextmanager
def _quiet(*names: str):
    """Loggers that report every graph pass at INFO (dozens of lines under Hydra's INFO root
    logger), held at WARNING meanwhile."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_detector(weights: Path, imgsz: int, cache_dir: Path) -> Path:
    """ultralytics' ONNX export of a YOLO .pt file (dynamic batch, `imgsz` square input).

    ultralytics writes its export beside the weights, so the weights are copied into a private
    folder of the cache first and exported there.
    """
    from ultralytics import YOLO

    with open(weights, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    fields = {
        "weights_sha256": digest,
        "format": "onnx",
        "imgsz": imgsz,
        "dynamic": True,
        "ultralytics": version("ultralytics"),
        "torch": torch.__version__,
        "onnx": version("onnx"),
        "onnxslim": version("onnxslim"),
    }
    path = Path(cache_dir) / "exports" / "detector" / f"{cache.key(fields)}.onnx"
    if path.is_file():
        return path
    log.info("exporting the detector %s to ONNX at imgsz %d at %s", weights.name, imgsz, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        copy = Path(tmp) / weights.name
        shutil.copyfile(weights, copy)
        threads = torch.get_num_threads()  # ultralytics changes the process-wide thread count
        try:
            out = YOLO(str(copy), task="detect").export(
                format="onnx", imgsz=imgsz, dynamic=True, simplify=True, verbose=False
            )
        finally:
            torch.set_num_threads(threads)
        cache.write_json(path.with_suffix(".json"), fields)
        os.replace(out, path)
    return path
