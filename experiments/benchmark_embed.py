"""Embedding throughput on Corel-1k, three ways in one process, reported as ratios.

- end-to-end: JPEG files -> decode -> preprocess -> model, with DataLoader workers (the path
  every experiment takes);
- model-only: the same model on already-preprocessed batches of the same size;
- naive: one image at a time, decode and model in turn, no workers.

    python experiments/benchmark_embed.py [--images 1000] [--workers 1] [--batch-size 32]

Warm-up batches are excluded. Results print as a table with the conditions they were
measured under (threads, batch size, workers, CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from visual_search.config import register_configs
from visual_search.data import load_dataset
from visual_search.embed import build_embedder, default_workers, embed_files
from visual_search.images import DecodeSettings, load_rgb

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    args = _parse()
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"embedder={args.embedder}"])
    dataset = load_dataset(cfg.dataset)
    paths = [dataset.root / p for p in dataset.items[: args.images]]
    embedder = build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
    settings = DecodeSettings()

    # Warm up the model and the allocator so no row pays for first-call costs.
    batch = torch.stack([embedder.transform(load_rgb(p)) for p in paths[: args.batch_size]])
    embedder.forward(batch)

    e2e = len(paths) / _seconds(
        lambda: embed_files(embedder, paths, settings, args.batch_size, args.workers)
    )
    model_only = (
        args.batches
        * len(batch)
        / _seconds(lambda: [embedder.forward(batch) for _ in range(args.batches)])
    )
    naive_paths = paths[: args.naive_images]
    naive = len(naive_paths) / _seconds(
        lambda: [embedder.embed_images([load_rgb(p)]) for p in naive_paths]
    )
    single_ms = 1000 / naive

    print(_conditions(args))
    print(f"{'path':<28}{'images/s':>10}{'x model-only':>14}")
    for name, rate in [("end-to-end (files)", e2e), ("model-only", model_only),
                       ("naive one-at-a-time", naive)]:  # fmt: skip
        print(f"{name:<28}{rate:>10.1f}{rate / model_only:>14.2f}")
    print(f"end-to-end / naive: {e2e / naive:.2f}x; one image decode+embed: {single_ms:.1f} ms")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _conditions(args) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"embedder={args.embedder} batch={args.batch_size} "
        f"workers={default_workers() if args.workers is None else args.workers} "
        f"torch_threads={torch.get_num_threads()} cores={os.cpu_count()} cpu={cpu} "
        f"images={args.images} (naive: {args.naive_images}) torch={torch.__version__}"
    )


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embedder", default="torchvision", choices=["torchvision", "timm"])
    p.add_argument("--images", type=int, default=1000, help="Corel-1k images end to end")
    p.add_argument("--naive-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="default: sized to the machine")
    p.add_argument("--batches", type=int, default=20, help="model-only batches")
    return p.parse_args()


if __name__ == "__main__":
    main()
