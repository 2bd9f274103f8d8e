"""Config schemas for every group, registered with Hydra's ConfigStore.

The primary config (`configs/config.yaml`) starts from `config_schema`, so a misspelt key or a
value of the wrong type fails when Hydra composes the config, before any compute. Checks that
need more than a type (a dataset root that exists, a weights name that resolves) live in the
module that owns the stage and run in `pipeline.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class DatasetKind(Enum):
    corel1k = "corel1k"
    grocery = "grocery"
    folder = "folder"


class Protocol(Enum):
    """How queries and database are drawn from a dataset."""

    leave_one_out = "leave_one_out"  # every image queries all the others
    street2shop = "street2shop"  # Grocery Store: test photos against the iconic product images
    natural = "natural"  # Grocery Store: test photos against train photos
    split = "split"  # own images: a `split` column in the CSV manifest says query or database


class Relevance(Enum):
    fine = "fine"  # same class
    coarse = "coarse"  # same coarse class (Grocery Store only)


class TieRule(Enum):
    pessimistic = "pessimistic"
    optimistic = "optimistic"
    expected = "expected"


@dataclass
class PathsConfig:
    data: str = MISSING
    models: str = MISSING
    cache: str = MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: DatasetKind = MISSING
    root: str = MISSING
    protocol: Protocol = Protocol.leave_one_out
    relevance: Relevance = Relevance.fine
    # Own images: a CSV manifest (path,label[,split]) instead of a folder per class.
    manifest: str | None = None
    # Keep the first N images of each class (sorted by path): a fast, deterministic subset.
    limit_per_class: int | None = None
    # Where a missing copy is fetched from, and the checksum it must match.
    url: str | None = None
    archive_subdir: str | None = None
    content_sha256: str | None = None


@dataclass
class DecodeConfig:
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    max_pixels: int = 89_478_485
    max_aspect_ratio: float = 50.0


@dataclass
class EmbedderConfig:
    library: str = "torchvision"  # where the architecture and weights come from: torchvision | timm
    # What runs the network: torch, onnxruntime (an ONNX export of the same torch model, cached
    # in paths.cache), or auto (onnxruntime when installed, else torch).
    backend: str = "auto"
    arch: str = "mobilenet_v2"
    # A weights name (torchvision: IMAGENET1K_V1; timm: mobilenetv2_100.ra_in1k) or a path to a
    # state_dict file.
    weights: str = "IMAGENET1K_V1"
    # Weights name -> file in paths.models holding exactly those weights, used instead of the
    # download. A name without an entry (or whose file is absent) is downloaded.
    local_files: dict[str, str] = field(default_factory=dict)
    # For a weights file: the published weights whose preprocessing the file was trained with.
    preprocess_from: str | None = None
    # Small batches keep MobileNetV2's activations in cache: on a 2-core Xeon, batch 8 ran
    # 1.3x faster than batch 32 (experiments/benchmark_embed.py). Raise it on bigger machines.
    batch_size: int = 8
    # `workers` threads each decode a batch and run the model on it with `threads` intra-op
    # threads, so decoding on one core overlaps the model on another. None sizes them to the
    # machine: min(cores, 4) workers, cores // workers threads each (on 2 cores, 2 x 1 ran
    # 1.3x faster end to end than 1 x 2; experiments/benchmark_embed.py).
    workers: int | None = None
    threads: int | None = None
    channels_last: bool = True  # torch backend: NHWC convolutions (several times faster on CPU)
    onnx_opset: int = 18


class RoiPolicy(Enum):
    none = "none"
    largest = "largest"
    most_confident = "most_confident"
    center = "center"
    all = "all"


class RoiSide(Enum):
    query = "query"
    database = "database"
    both = "both"


@dataclass
class RoiConfig:
    policy: RoiPolicy = RoiPolicy.none  # none: no detection, every image whole
    side: RoiSide = RoiSide.both  # which images are cropped
    detector: str = "yolov8n.pt"  # file name looked up in paths.models, or a path
    # What runs a .pt detector: torch, onnxruntime (ultralytics' ONNX export, cached in
    # paths.cache), or auto (onnxruntime when installed). A .onnx or .tflite detector file runs
    # on its own runtime whatever this says.
    backend: str = "auto"
    conf: float = 0.25
    iou: float = 0.7
    classes: list[str] | None = None  # COCO names or ids; None keeps every class
    imgsz: int = 320
    max_det: int = 20
    device: str = "cpu"
    batch_size: int = 16
    padding: float = 0.1  # grow the box by this fraction of its width/height on each side
    min_area: float = 0.01  # ignore boxes smaller than this fraction of the image


@dataclass
class IndexConfig:
    name: str = "flat"
    # A FAISS index factory string; the index configs build it from the fields below.
    factory: str = "Flat"
    nlist: int | None = None  # inverted lists (IVF)
    M: int | None = None  # PQ sub-quantizers, or HNSW links per node
    nbits: int | None = None  # bits per PQ code
    efConstruction: int | None = None  # HNSW build depth
    # Search settings evaluated on the one built index, e.g. {nprobe: [1, 4, 16]}: each
    # combination is scored and timed, and tracked as a nested MLflow run.
    search_grid: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class SearchConfig:
    # Depth of each ranking; None ranks the whole database (what full mAP needs).
    k: int | None = None
    # Queries per search call, so scores never exceed chunk x database in memory.
    max_pairs_per_chunk: int = 4_000_000


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50, 100])
    ties: TieRule = TieRule.pessimistic
    grid_queries: int = 6
    grid_k: int = 8
    bootstrap_resamples: int = 10_000  # paired bootstrap of ROI against the whole image


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = MISSING
    artifact_root: str | None = None
    experiment: str = MISSING
    run_name: str | None = None


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0


def register_configs() -> None:
    """Make the schema available to `defaults` lists as `config_schema`."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def unknown_keys(cfg: DictConfig, schema: DictConfig | None = None, prefix: str = "") -> list[str]:
    """Dotted keys of `cfg` that the schema does not define.

    Composition already refuses these, except those added with Hydra's `+key=value`, which
    lifts the schema's strictness on purpose.
    """
    schema = OmegaConf.structured(Config) if schema is None else schema
    unknown = []
    known = set(schema.keys())  # `in` would skip keys whose value is still MISSING
    for name in cfg.keys():
        path = f"{prefix}{name}"
        if name not in known:
            unknown.append(path)
        elif OmegaConf.is_missing(cfg, name):
            continue
        elif OmegaConf.is_dict(cfg[name]) and is_dataclass(OmegaConf.get_type(schema[name])):
            unknown += unknown_keys(cfg[name], schema[name], f"{path}.")
    return unknown
