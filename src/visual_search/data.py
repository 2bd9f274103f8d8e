"""Datasets: images with ids and labels, a query set, a database set and a relevance rule.

Relevance is always "same label": `Dataset.labels` holds the label the rule compares (the fine
class, or the coarse class when `dataset.relevance=coarse`). Item ids are paths relative to the
dataset root, so they stay stable across machines and name the file in every report.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visual_search.config import DatasetKind, Protocol, Relevance

log = logging.getLogger(__name__)

COREL_CLASSES = [
    "africa_people", "beaches", "buildings_monuments", "buses", "dinosaurs",
    "elephants", "flowers", "horses", "mountains_glaciers", "food",
]  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DatasetError(ValueError):
    """The dataset is missing, incomplete or described wrongly; the message says how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """A retrieval dataset.

    Attributes:
        name: config name, e.g. ``corel1k``.
        root: directory the item paths are relative to.
        items: relative path of each image; also its id.
        labels: (n,) int64 relevance label of each item.
        class_names: name of each label value.
        query: (nq,) indices into ``items`` of the queries.
        database: (nd,) indices into ``items`` of the database.
    """

    name: str
    root: Path
    items: list[str]
    labels: np.ndarray
    class_names: list[str]
    query: np.ndarray
    database: np.ndarray

    def self_positions(self) -> np.ndarray:
        """(nq,) position of each query inside the database, -1 where it is not part of it."""
        position = np.full(len(self.items), -1, dtype=np.int64)
        position[self.database] = np.arange(len(self.database))
        return position[self.query]

    def used_items(self) -> np.ndarray:
        """Sorted indices of the items that are a query, in the database, or both."""
        return np.union1d(self.query, self.database)

    def without(self, dropped: Sequence[int]) -> Dataset:
        """The same dataset with the given item indices removed from queries and database."""
        keep_q = ~np.isin(self.query, dropped)
        keep_d = ~np.isin(self.database, dropped)
        return Dataset(
            self.name, self.root, self.items, self.labels, self.class_names,
            self.query[keep_q], self.database[keep_d],
        )  # fmt: skip


def load_dataset(cfg) -> Dataset:
    """Build the dataset a `dataset` config describes, fetching it first if it is missing.

    Raises:
        DatasetError: the files are not where the config says, and could not be fetched.
    """
    root = Path(cfg.root).expanduser()
    if not root.exists() and cfg.url:
        # The fetched copy is checked before it is moved into place, so a copy that fails its
        # checksum is never found there by a later run.
        def verify(staged: Path) -> None:
            verify_checksum(_build(cfg, staged), cfg.content_sha256)

        download(cfg.url, root, cfg.archive_subdir, DatasetKind(cfg.kind), verify)
    if not root.is_dir():
        raise DatasetError(_where_to_get(cfg, f"dataset root {root} does not exist"))

    dataset = _build(cfg, root)
    if cfg.limit_per_class:
        dataset = _limit_per_class(dataset, cfg.limit_per_class)
    log.info(
        "dataset %s: %d images, %d queries, %d database, %d classes%s",
        dataset.name, len(dataset.used_items()), len(dataset.query), len(dataset.database),
        len(dataset.class_names),
        f" (first {cfg.limit_per_class} per class)" if cfg.limit_per_class else "",
    )  # fmt: skip
    return dataset


def _build(cfg, root: Path) -> Dataset:
    kind = DatasetKind(cfg.kind)
    if kind is DatasetKind.corel1k:
        dataset = _corel1k(cfg, root)
    elif kind is DatasetKind.grocery:
        dataset = _grocery(cfg, root)
    else:
        dataset = _folder(cfg, root)
    check_files(dataset, cfg)
    return dataset


def check_files(dataset: Dataset, cfg) -> None:
    """Fail before any compute if an image the manifest lists is missing."""
    missing = [p for p in dataset.items if not (dataset.root / p).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DatasetError(
            _where_to_get(cfg, f"{len(missing)} of {len(dataset.items)} images listed by the "
                               f"manifest are missing under {dataset.root} ({shown})")
        )  # fmt: skip


def fingerprint(root: Path, items: Sequence[str]) -> tuple[str, list[str]]:
    """Content fingerprint of a list of files, and the sha256 of each.

    The fingerprint is the sha256 of the lines ``"<path>  <sha256 of bytes>"`` in sorted path
    order, the same rule as the `content_sha256` of the datasets' manifest.json files.
    """
    digests = [_sha256_file(root / p) for p in items]
    lines = sorted(f"{p}  {d}" for p, d in zip(items, digests, strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), digests


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _where_to_get(cfg, problem: str) -> str:
    hint = (
        f"set VISUAL_SEARCH_DATA (or paths.data=...) to the folder holding '{Path(cfg.root).name}'"
        if DatasetKind(cfg.kind) is not DatasetKind.folder
        else "set dataset.root=DIR to a folder of class sub-folders, or dataset.manifest=FILE.csv"
    )
    source = f"; it is fetched from {cfg.url} when the root is absent" if cfg.url else ""
    return f"{problem}. {hint}{source}"


def _corel1k(cfg, root: Path) -> Dataset:
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        with open(labels_csv, newline="") as f:
            rows = [(r["filename"], int(r["class_id"])) for r in csv.DictReader(f)]
    else:
        # The original release has no label file: the class is the file number // 100.
        files = sorted((root / "images").glob("*.jpg"), key=lambda p: int(p.stem))
        rows = [(f"images/{p.name}", int(p.stem) // 100) for p in files]
    if not rows:
        raise DatasetError(_where_to_get(cfg, f"no Corel-1k images found under {root}"))
    items = [r[0] for r in rows]
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    every = np.arange(len(items))
    return Dataset(cfg.name, root, items, labels, list(COREL_CLASSES), every, every)


def _grocery(cfg, root: Path) -> Dataset:
    base = root / "dataset"
    if not (base / "classes.csv").is_file():
        raise DatasetError(_where_to_get(cfg, f"{base / 'classes.csv'} not found"))
    coarse = Relevance(cfg.relevance) is Relevance.coarse
    with open(base / "classes.csv", newline="") as f:
        classes = list(csv.reader(f))[1:]
    fine_names = [c[0] for c in classes]
    coarse_of = {int(c[1]): int(c[3]) for c in classes}
    coarse_names = {int(c[3]): c[2] for c in classes}

    def split_rows(split: str) -> list[tuple[str, int]]:
        path = base / f"{split}.txt"
        if not path.is_file():
            raise DatasetError(_where_to_get(cfg, f"{path} not found"))
        rows = [line.split(",") for line in path.read_text().splitlines() if line.strip()]
        return [(f"dataset/{r[0].strip()}", int(r[1])) for r in rows]

    queries = split_rows("test")
    if Protocol(cfg.protocol) is Protocol.street2shop:
        database = [(f"dataset{c[4].strip()}", int(c[1])) for c in classes]
    elif Protocol(cfg.protocol) is Protocol.natural:
        database = split_rows("train")
    else:
        raise DatasetError(
            f"dataset.protocol={cfg.protocol} is not a Grocery Store protocol; "
            "use street2shop or natural"
        )
    rows = queries + database
    fine = np.array([r[1] for r in rows], dtype=np.int64)
    labels = np.array([coarse_of[c] for c in fine]) if coarse else fine
    names = [coarse_names[i] for i in range(max(coarse_names) + 1)] if coarse else fine_names
    return Dataset(
        cfg.name, root, [r[0] for r in rows], labels, names,
        np.arange(len(queries)), np.arange(len(queries), len(rows)),
    )  # fmt: skip


def _folder(cfg, root: Path) -> Dataset:
    if cfg.manifest:
        paths, label_names, splits = _read_manifest(Path(cfg.manifest).expanduser())
    else:
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        paths = [p.relative_to(root).as_posix() for p in files]
        loose = [p for p in paths if len(Path(p).parts) == 1]
        if loose:
            raise DatasetError(
                f"dataset.root={root} holds {len(loose)} images outside class sub-folders (e.g. "
                f"{loose[0]}): put each class in its own sub-folder, or list the images with "
                "their labels in dataset.manifest=FILE.csv"
            )
        label_names = [Path(p).parts[0] for p in paths]
        splits = None
    if not paths:
        raise DatasetError(_where_to_get(cfg, f"no images found under {root}"))
    class_names = sorted(set(label_names))
    labels = np.array([class_names.index(n) for n in label_names], dtype=np.int64)
    every = np.arange(len(paths))
    if Protocol(cfg.protocol) is Protocol.split:
        if splits is None:
            raise DatasetError("dataset.protocol=split needs dataset.manifest with a split column")
        query = every[np.array(splits) == "query"]
        database = every[np.array(splits) == "database"]
    elif Protocol(cfg.protocol) is Protocol.leave_one_out:
        query = database = every
    else:
        raise DatasetError(
            f"dataset.protocol={cfg.protocol} does not apply to own images; "
            "use leave_one_out or split"
        )
    return Dataset(cfg.name, root, paths, labels, class_names, query, database)


def _read_manifest(path: Path) -> tuple[list[str], list[str], list[str] | None]:
    if not path.is_file():
        raise DatasetError(f"dataset.manifest={path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if not {"path", "label"} <= fields:
            raise DatasetError(
                f"dataset.manifest={path} needs columns path,label[,split], got {sorted(fields)}"
            )
        rows = list(reader)
    short = [n for n, r in enumerate(rows, start=2) if None in r.values() or None in r]
    if short:
        raise DatasetError(
            f"dataset.manifest={path}: row {short[0]} does not have a value for every column "
            f"({len(short)} such rows)"
        )
    splits = [r["split"].strip() for r in rows] if "split" in fields else None
    bad = sorted({s for s in splits or [] if s not in ("query", "database")})
    if bad:
        raise DatasetError(
            f"the split column of dataset.manifest={path} must be query or database, got {bad}"
        )
    return [r["path"].strip() for r in rows], [r["label"].strip() for r in rows], splits


def _limit_per_class(dataset: Dataset, n: int) -> Dataset:
    """Keep the first `n` items of each label, in path order, on each side."""

    def first_n(indices: np.ndarray) -> np.ndarray:
        order = sorted(indices, key=lambda i: (dataset.labels[i], dataset.items[i]))
        kept, seen = [], {}
        for i in order:
            seen[dataset.labels[i]] = seen.get(dataset.labels[i], 0) + 1
            if seen[dataset.labels[i]] <= n:
                kept.append(i)
        return np.array(sorted(kept), dtype=np.int64)

    return Dataset(
        dataset.name, dataset.root, dataset.items, dataset.labels, dataset.class_names,
        first_n(dataset.query), first_n(dataset.database),
    )  # fmt: skip


def download(
    url: str,
    root: Path,
    subdir: str | None,
    kind: DatasetKind,
    verify: Callable[[Path], None] | None = None,
) -> None:
    """Fetch a dataset archive and unpack it as `root`, writing nothing there unless it succeeds.

    NOTE: the two upstream archives (GitHub snapshots at fixed commits) could not be fetched on
    the offline machine this was written on; the unpacking is tested on a local archive.
    """
    log.info("dataset root %s is missing: fetching %s", root, url)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as err:
            raise DatasetError(
                f"could not fetch {url} ({err}); download it by hand, or set VISUAL_SEARCH_DATA "
                f"to a folder that already holds '{root.name}'"
            ) from err
        with zipfile.ZipFile(archive) as z:
            z.extractall(Path(tmp) / "unpacked")
        source = Path(tmp) / "unpacked" / (subdir or "")
        staged = Path(tmp) / "staged"
        if kind is DatasetKind.corel1k:
            _stage_corel1k(source, staged)
        else:
            shutil.move(source, staged)
        if verify is not None:
            verify(staged)
        staged.rename(root)
    log.info("dataset unpacked into %s", root)


def _stage_corel1k(source: Path, staged: Path) -> None:
    (staged / "images").mkdir(parents=True)
    for p in source.rglob("*.jpg"):
        if p.stem.isdigit():
            shutil.copy2(p, staged / "images" / p.name)
    rows = sorted((int(p.stem), p.name) for p in (staged / "images").iterdir())
    with open(staged / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "class_id", "class_name"])
        for number, name in rows:
            w.writerow([f"images/{name}", number // 100, COREL_CLASSES[number // 100]])


def verify_checksum(dataset: Dataset, expected: str | None) -> str:
    """Fingerprint the dataset's images; raise if it differs from `expected` (when given)."""
    digest, _ = fingerprint(dataset.root, dataset.items)
    if expected and digest != expected:
        raise DatasetError(
            f"{dataset.name} at {dataset.root} has content sha256 {digest}, expected {expected} "
            "(dataset.content_sha256): the copy is incomplete or altered"
        )
    return digest
