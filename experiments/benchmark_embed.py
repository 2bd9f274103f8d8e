"""Embedding and detection throughput on Corel-1k, every runtime in one process.

For each embedder backend (torch, onnxruntime):

- model-only: the model on an already-preprocessed batch, repeated;
- end to end: JPEG files -> decode -> preprocess -> model, with the embedder's workers (each
  decodes a batch and runs the model on it: the path every experiment takes), and the same
  with decoding and model in turn in one thread with all cores for the model;
- one image: decode + preprocess + embed of a single file, the median over many files.

Then the detector (YOLO through ultralytics) at each input size, torch against its ONNX export.

    python experiments/benchmark_embed.py [--images 1000] [--batch-size 8] [--workers 2]

Warm-up runs are excluded. Ratios are against ONNX Runtime model-only in this same process, so
they hold on a loaded machine where absolute rates drift. Conditions (threads, CPU, versions)
print with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from visual_search import runtime, timing
from visual_search.config import register_configs
from visual_search.data import load_dataset
from visual_search.embed import build_embedder, embed_files
from visual_search.images import DecodeSettings, load_rgb
from visual_search.roi import YoloDetector

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    args = _parse()
    register_configs()
    backends = ["torch"] + (["onnxruntime"] if runtime.onnxruntime_installed() else [])
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"embedder={args.embedder}"])
        roi_cfg = compose("config", overrides=["roi=yolo"]).roi
    dataset = load_dataset(cfg.dataset)
    paths = [dataset.root / p for p in dataset.items[: args.images]]
    settings = DecodeSettings()
    cfg.embedder.workers = args.workers

    rows, details = [], []
    for backend in backends:
        cfg.embedder.backend = backend
        backend_rows, detail = _embedding(cfg, paths, settings, args)
        rows += backend_rows
        details.append(detail)

    reference = rows[3 if len(rows) > 3 else 0][1]
    print(_conditions(args))
    print(f"{'embedding (batch ' + str(args.batch_size) + ')':<48}{'images/s':>10}{'ratio':>8}")
    for name, rate in rows:
        print(f"{name:<48}{rate:>10.1f}{rate / reference:>8.2f}")
    print("ratio: against ONNX Runtime model-only (torch model-only if it is not installed)")
    for line in details:
        print(line)

    images = [load_rgb(p, settings) for p in paths[: args.detect_images]]
    print(f"\n{'detection (batch ' + str(roi_cfg.batch_size) + ')':<48}{'images/s':>10}")
    for backend in backends:
        for imgsz in args.imgsz:
            roi_cfg.backend, roi_cfg.imgsz = backend, imgsz
            detector = YoloDetector(roi_cfg, cfg.paths.models, cfg.paths.cache)
            rate = _detection_rate(detector, images, roi_cfg.batch_size)
            print(f"{backend + ' ' + str(imgsz) + ' px':<48}{rate:>10.1f}")


def _embedding(cfg, paths, settings, args) -> tuple[list[tuple[str, float]], str]:
    """Rows for one backend: model-only, end to end with workers, end to end in turn."""
    backend = cfg.embedder.backend
    cfg.embedder.threads = None
    embedder = build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
    # The baseline: one worker with every core, decoding and model in turn.
    cfg.embedder.threads = os.cpu_count()
    whole = build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
    batch = whole.batch([load_rgb(p) for p in paths[: args.batch_size]])
    for e in (embedder, whole):  # warm-up
        embed_files(e, paths[: 4 * args.batch_size], settings, args.batch_size)
    torch.set_num_threads(os.cpu_count())
    model_only = (
        args.batches
        * len(batch)
        / _seconds(lambda: [whole.forward(batch) for _ in range(args.batches)])
    )
    with_workers = len(paths) / _seconds(
        lambda: embed_files(embedder, paths, settings, args.batch_size)
    )
    in_turn = len(paths) / _seconds(
        lambda: embed_files(whole, paths, settings, args.batch_size, workers=0)
    )
    single = [
        _seconds(lambda p=p: whole.embed_images([load_rgb(p, settings)])) * 1000
        for p in paths[: args.single_images]
    ]
    rows = [
        (f"{backend} model-only, {whole.threads} threads", model_only),
        (f"{backend} end to end, {embedder.workers} workers x {embedder.threads} threads",
         with_workers),
        (f"{backend} end to end, in turn, {whole.threads} threads", in_turn),
    ]  # fmt: skip
    detail = (
        f"{backend}: one image decode+embed median {statistics.median(single):.1f} ms, "
        f"p95 {_p95(single):.1f} ms ({whole.threads} threads)"
    )
    return rows, detail


def _detection_rate(detector, images, step: int) -> float:
    detector.detect(images[:step])  # warm-up
    seconds = _seconds(
        lambda: [detector.detect(images[s : s + step]) for s in range(0, len(images), step)]
    )
    return len(images) / seconds


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _p95(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.95 * len(values)))]


def _conditions(args) -> str:
    return (
        f"embedder={args.embedder} batch={args.batch_size} "
        f"cores={os.cpu_count()} cpu={timing.cpu_model()} images={args.images} "
        f"torch={torch.__version__} onnxruntime={runtime.version('onnxruntime')}"
    )


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embedder", default="torchvision", choices=["torchvision", "timm"])
    p.add_argument("--images", type=int, default=1000, help="Corel-1k images end to end")
    p.add_argument("--single-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="default: sized to the machine")
    p.add_argument("--batches", type=int, default=40, help="model-only batches")
    p.add_argument("--detect-images", type=int, default=160)
    p.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    return p.parse_args()


if __name__ == "__main__":
    main()
