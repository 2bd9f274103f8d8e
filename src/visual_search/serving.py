"""Serve a tracked configuration: choose an MLflow run, rebuild its index, answer queries.

The served run is either named by id or chosen by a rule over tracked runs: the highest value of
a metric, optionally on one dataset and under a latency bound. A run from an index sweep's
search grid is a nested run; its config is its parent's and its search settings its own
``search.*`` params. Everything the searcher needs (embeddings, index) comes from the cache when
present and is built otherwise, exactly as the experiment built it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from visual_search import data, embed, index, pipeline, roi, tracking
from visual_search.config import Config, RoiPolicy

log = logging.getLogger(__name__)


class ServeError(ValueError):
    """The served run cannot be chosen or loaded; the message names the setting."""


def store_uri(uri: str) -> str:
    """The tracking URI to read runs from: an existing store, never a new one."""
    try:
        return tracking.existing_store(uri, "serve.tracking_uri")
    except tracking.TrackingError as err:
        raise ServeError(str(err)) from err


@dataclass
class Choice:
    """The run a server serves, and why."""

    run_id: str
    config_run_id: str  # the run holding config.yaml (the parent of a search-grid run)
    experiment: str
    metrics: dict[str, float]
    search: dict[str, float]  # search-time index settings, e.g. {"nprobe": 8}
    rule: str


def choose_run(
    uri: str,
    run_id: str | None = None,
    metric: str = "map",
    dataset: str | None = None,
    max_latency_ms: float | None = None,
    latency_metric: str = "ms_per_query_p95",
    experiment_prefix: str = "visual-search-",
) -> Choice:
    """The run `run_id` names, or the best finished run by `metric` under the constraints."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            raise ServeError(f"serve.run_id={run_id}: no such run in {uri} ({err})") from err
        rule = f"run id {run_id}"
    else:
        experiments = [
            e.experiment_id for e in client.search_experiments()
            if e.name.startswith(experiment_prefix)
        ]  # fmt: skip
        if not experiments:
            raise ServeError(
                f"no experiments named {experiment_prefix}* in {uri}: run an experiment first "
                "(make bench), or set serve.tracking_uri / serve.run_id"
            )
        filters = [f"metrics.{metric} >= 0", "attributes.status = 'FINISHED'"]
        if dataset:
            filters.append(f"params.`dataset.name` = '{dataset}'")
        if max_latency_ms is not None:
            filters.append(f"metrics.{latency_metric} <= {float(max_latency_ms)}")
        found = client.search_runs(
            experiments, " and ".join(filters), order_by=[f"metrics.{metric} DESC"],
            max_results=1,
        )  # fmt: skip
        rule = f"highest {metric}" + (f" on {dataset}" if dataset else "")
        if max_latency_ms is not None:
            rule += f" with {latency_metric} <= {max_latency_ms}"
        if not found:
            raise ServeError(
                f"no finished run in {uri} has {rule}; relax serve.max_latency_ms or "
                "serve.dataset_name, or set serve.run_id"
            )
        run = found[0]
    search = {
        k.removeprefix("search."): _number(v)
        for k, v in run.data.params.items()
        if k.startswith("search.") and k.count(".") == 1 and k not in _SEARCH_CONFIG_PARAMS
    }
    # A search-grid setting is a nested run whose config lives with its parent; a sweep's job
    # also has a parent (the sweep's run) but holds its own config.
    parent = run.data.tags.get("mlflow.parentRunId")
    config_run = parent if parent and search else run.info.run_id
    experiment = client.get_experiment(run.info.experiment_id).name
    return Choice(run.info.run_id, config_run, experiment, dict(run.data.metrics), search, rule)


# Params of the `search` config group, as opposed to a grid run's index search settings.
_SEARCH_CONFIG_PARAMS = {"search.k", "search.max_pairs_per_chunk"}


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() else value


def run_config(uri: str, choice: Choice, paths: DictConfig | None = None) -> DictConfig:
    """The chosen run's resolved config, with this machine's `paths` when given."""
    from mlflow.artifacts import download_artifacts

    try:
        local = download_artifacts(
            run_id=choice.config_run_id, artifact_path="config.yaml", tracking_uri=uri
        )
    except Exception as err:  # noqa: BLE001 -- MLflow raises several kinds for a missing file
        raise ServeError(
            f"run {choice.config_run_id} has no config.yaml artifact ({err}); choose a run "
            "made by experiments/run.py"
        ) from err
    saved = upgrade(OmegaConf.load(local))
    cfg = OmegaConf.merge(OmegaConf.structured(Config), saved)
    if paths is not None:
        here = OmegaConf.to_container(paths, resolve=True)
        cfg.paths = OmegaConf.merge(cfg.paths, here)
        # The dataset root was resolved under the run's paths.data: move it under this one.
        old, root = Path(str(saved.paths.data)), Path(str(cfg.dataset.root))
        if root.is_relative_to(old):
            cfg.dataset.root = str(Path(here["data"]) / root.relative_to(old))
    return cfg


def upgrade(saved: DictConfig) -> DictConfig:
    """A config saved by an earlier version, in today's keys.

    `embedder.backend` once named the library (torchvision or timm); those runs ran in torch.
    `embedder.num_workers` (DataLoader processes) gave way to `embedder.workers` (threads).
    """
    embedder = saved.get("embedder")
    if embedder is not None:
        if embedder.get("backend") in ("torchvision", "timm"):
            embedder.library, embedder.backend = embedder.backend, "torch"
        if "num_workers" in embedder:
            embedder.pop("num_workers")
    return saved


@dataclass
class Hit:
    item: int  # index into the dataset's items
    path: str  # relative to the dataset root
    score: float  # cosine similarity
    label: str | None


@dataclass
class Searcher:
    """The database of one configuration, searchable with uploaded images."""

    cfg: DictConfig
    dataset: data.Dataset
    embedder: embed.Embedder
    index: Any
    owner: np.ndarray  # database row -> item index
    search: dict[str, float] = field(default_factory=dict)
    _served: frozenset[int] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, cfg: DictConfig, search: dict[str, float] | None = None) -> Searcher:
        pipeline.validate(cfg)
        images = pipeline.hash_images(data.load_dataset(cfg.dataset))
        embedder = embed.build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
        detector = pipeline.build_detector(cfg)
        crops = pipeline.plan_crops(cfg, images, detector)
        embedded = pipeline.embed_crops(cfg, images, crops, embedder)
        built, _ = pipeline.build_index(cfg, embedded.database)
        if search:
            index.set_search_params(built, search)
        owner = embedded.dataset.database[embedded.database.owner]
        log.info("serving %d database rows of %s", len(owner), cfg.dataset.name)
        return cls(cfg, embedded.dataset, embedder, built, owner, dict(search or {}))

    def query(self, image: Image.Image, k: int) -> list[Hit]:
        """The k best database images for one decoded image (one hit per image)."""
        vector = self.embedder.embed_images([image])
        wanted = k if len(self.owner) == len(set(self.owner.tolist())) else 4 * k
        scores, rows = index.search(self.index, vector, min(wanted, len(self.owner)))
        hits, seen = [], set()
        for score, row in zip(scores[0], rows[0], strict=True):
            if row < 0 or not math.isfinite(score):
                continue
            item = int(self.owner[row])
            if item in seen:
                continue  # an image with several crops counts once, at its best crop
            seen.add(item)
            label = self.dataset.labels[item]
            names = self.dataset.class_names
            hits.append(Hit(item, self.dataset.items[item], float(score),
                            names[label] if 0 <= label < len(names) else None))  # fmt: skip
            if len(hits) == k:
                break
        return hits

    def image_path(self, item: int) -> Path:
        return self.dataset.root / self.dataset.items[item]

    def serves(self, item: int) -> bool:
        """Whether `item` is one of the database images a search can return."""
        if self._served is None:
            self._served = frozenset(self.owner.tolist())
        return item in self._served


def detector_for(cfg: DictConfig, roi_cfg: DictConfig | None = None) -> roi.YoloDetector:
    """The detector the served run used, or the given `roi` settings when it used none."""
    if RoiPolicy(cfg.roi.policy) is not RoiPolicy.none or roi_cfg is None:
        return roi.YoloDetector(cfg.roi, cfg.paths.models, cfg.paths.cache)
    return roi.YoloDetector(roi_cfg, cfg.paths.models, cfg.paths.cache)
