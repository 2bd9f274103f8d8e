"""Datasets: images with ids and labels, a query set, a database set and a relevance rule.

Relevance is always "same label": `Dataset.labels` holds the label the rule compares (the fine
class, or the coarse class when `dataset.relevance=coarse`). Item ids are paths relative to the
dataset root, unique within a dataset, so they stay stable across machines and name the file in
every report; an image that is both a query and in the database is one item on both sides.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from visual_search.config import DatasetKind, Protocol, Relevance

log = logging.getLogger(__name__)

COREL_CLASSES = [
    "africa_people", "beaches", "buildings_monuments", "buses", "dinosaurs",
    "elephants", "flowers", "horses", "mountains_glaciers", "food",
]  # fmt: skip
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
# The protocols each kind of dataset supports; only Grocery Store has coarse classes.
PROTOCOLS = {
    DatasetKind.corel1k: (Protocol.leave_one_out,),
    DatasetKind.grocery: (Protocol.street2shop, Protocol.natural),
    DatasetKind.folder: (Protocol.leave_one_out, Protocol.split),
}


class DatasetError(ValueError):
    """The dataset is missing, incomplete or described wrongly; the message says how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """A retrieval dataset.

    Attributes:
        name: config name, e.g. ``corel1k``.
        root: directory the item paths are relative to.
        items: relative path of each image, unique; also its id.
        labels: (n,) int64 relevance label of each item.
        class_names: name of each label value.
        query: (nq,) indices into ``items`` of the queries.
        database: (nd,) indices into ``items`` of the database.
        excluded: files found but left out before reading (e.g. a broken link or a named
            pipe, which would block a reader), relative path -> why.
    """

    name: str
    root: Path
    items: list[str]
    labels: np.ndarray
    class_names: list[str]
    query: np.ndarray
    database: np.ndarray
    excluded: dict[str, str] = field(default_factory=dict)

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
            self.query[keep_q], self.database[keep_d], self.excluded,
        )  # fmt: skip


def load_dataset(cfg) -> Dataset:
    """Build the dataset a `dataset` config describes, fetching it first if it is missing.

    Raises:
        DatasetError: a setting does not apply to this dataset, the files are not where the
            config says and could not be fetched, or they describe an unusable dataset.
    """
    check_settings(cfg)
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(_where_to_get(cfg, f"dataset root {root} is not a folder"))
    if not root.exists() and cfg.url:
        # The fetched copy is checked before it is moved into place, so a copy that fails its
        # checksum is never found there by a later run.
        def verify(staged: Path) -> None:
            verify_checksum(_build(cfg, staged), cfg.content_sha256)

        download(cfg.url, root, cfg.archive_subdir, DatasetKind(cfg.kind), verify)
    if not root.is_dir():
        raise DatasetError(_where_to_get(cfg, f"dataset root {root} does not exist"))

    dataset = _build(cfg, root)
    if cfg.limit_per_class is not None:
        dataset = _limit_per_class(dataset, cfg.limit_per_class)
    log.info(
        "dataset %s: %d images, %d queries, %d database, %d classes%s",
        dataset.name, len(dataset.used_items()), len(dataset.query), len(dataset.database),
        len(dataset.class_names),
        f" (first {cfg.limit_per_class} per class)" if cfg.limit_per_class else "",
    )  # fmt: skip
    return dataset


def check_settings(cfg) -> None:
    """Refuse `dataset` settings that are out of range or do not apply to its kind.

    Reads no files, so a wrong setting fails before anything is fetched or read.
    """
    kind, protocol = DatasetKind(cfg.kind), Protocol(cfg.protocol)
    if cfg.limit_per_class is not None and cfg.limit_per_class < 1:
        raise DatasetError(
            f"dataset.limit_per_class must be >= 1, or null for no limit; got {cfg.limit_per_class}"
        )
    if protocol not in PROTOCOLS[kind]:
        raise DatasetError(
            f"dataset.protocol={protocol.value} does not apply to dataset.kind={kind.value}; use "
            + " or ".join(p.value for p in PROTOCOLS[kind])
        )
    if Relevance(cfg.relevance) is Relevance.coarse and kind is not DatasetKind.grocery:
        raise DatasetError(
            f"dataset.relevance=coarse does not apply to dataset.kind={kind.value}, which has no "
            f"coarse classes; use {Relevance.fine.value}"
        )


def _build(cfg, root: Path) -> Dataset:
    kind = DatasetKind(cfg.kind)
    if kind is DatasetKind.corel1k:
        dataset = _corel1k(cfg, root)
    elif kind is DatasetKind.grocery:
        dataset = _grocery(cfg, root)
    else:
        dataset = _folder(cfg, root)
    _check_shape(dataset, cfg)
    check_files(dataset, cfg)
    return dataset


def _check_shape(dataset: Dataset, cfg) -> None:
    """Fail if an image is listed twice, or if either side of the search is empty."""
    repeated = [p for p, n in Counter(dataset.items).items() if n > 1]
    if repeated:
        raise DatasetError(
            _where_to_get(cfg, f"{len(repeated)} images are listed more than once under "
                               f"{dataset.root} (e.g. {repeated[0]}), so a query would find its "
                               "own copy as a relevant hit")
        )  # fmt: skip
    for side, indices in (("query", dataset.query), ("database", dataset.database)):
        if len(indices) == 0:
            problem = (
                f"{dataset.name} has no {side} images ({len(dataset.query)} queries, "
                f"{len(dataset.database)} database)"
            )
            if cfg.manifest:
                raise DatasetError(
                    f"{problem}: give some rows of dataset.manifest={cfg.manifest} split={side}"
                )
            raise DatasetError(_where_to_get(cfg, problem))


def check_files(dataset: Dataset, cfg) -> None:
    """Fail before any compute if an image the manifest lists is missing."""
    missing = [p for p in dataset.items if not (dataset.root / p).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DatasetError(
            _where_to_get(cfg, f"{len(missing)} of {len(dataset.items)} images listed by the "
                               f"manifest are missing under {dataset.root} ({shown})")
        )  # fmt: skip


def fingerprint(root: Path, items: Sequence[str]) -> tuple[str, list[str | None]]:
    """Content fingerprint of a list of files, and the sha256 of each.

    The fingerprint is the sha256 of the lines ``"<path>  <sha256 of bytes>"`` in sorted path
    order, the same rule as the `content_sha256` of the datasets' manifest.json files. A file
    that cannot be read gets the digest None, is logged as a warning with the reason, and is
    left out of the fingerprint, which then covers the readable files only.
    """
    digests = [_sha256_file(root / p) for p in items]
    lines = sorted(f"{p}  {d}" for p, d in zip(items, digests, strict=True) if d is not None)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), digests


def _sha256_file(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        log.warning("cannot read %s (%s): it has no digest", path, err.strerror or err)
        return None


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

    # check_settings has limited the protocol to street2shop or natural.
    queries = split_rows("test")
    if Protocol(cfg.protocol) is Protocol.street2shop:
        database = [(f"dataset{c[4].strip()}", int(c[1])) for c in classes]
    else:
        database = split_rows("train")
    rows = queries + database
    fine = np.array([r[1] for r in rows], dtype=np.int64)
    labels = np.array([coarse_of[c] for c in fine]) if coarse else fine
    names = [coarse_names[i] for i in range(max(coarse_names) + 1)] if coarse else fine_names
    return Dataset(
        cfg.name, root, [r[0] for r in rows], labels, names,
        np.arange(len(queries)), np.arange(len(queries), len(rows)),
    )  # fmt: skip


_SIDES = ("query", "database")


class _Row(NamedTuple):
    """One manifest row; `number` is its row in a spreadsheet (the header is row 1)."""

    number: int
    path: str
    label: str
    split: str | None


def _folder(cfg, root: Path) -> Dataset:
    split = Protocol(cfg.protocol) is Protocol.split
    if cfg.manifest:
        manifest = Path(cfg.manifest).expanduser()
        rows, has_split = _read_manifest(manifest)
        if split and not has_split:
            raise DatasetError(
                f"dataset.protocol=split needs a split column in dataset.manifest={manifest}; "
                "add one (query or database), or use dataset.protocol=leave_one_out"
            )
        paths, label_names, sides = _unique_rows(manifest, rows)
        excluded = {}
        if not paths:
            raise DatasetError(f"dataset.manifest={manifest} lists no images")
    else:
        if split:
            raise DatasetError("dataset.protocol=split needs dataset.manifest with a split column")
        paths, label_names, excluded = _class_folders(root)
        sides = [{None} for _ in paths]
        if not paths:
            raise DatasetError(_where_to_get(cfg, f"no images found under {root}"))

    class_names = sorted(set(label_names))
    label_of = {name: i for i, name in enumerate(class_names)}
    labels = np.array([label_of[n] for n in label_names], dtype=np.int64)
    if split:
        query = np.array([i for i, s in enumerate(sides) if "query" in s], dtype=np.int64)
        database = np.array([i for i, s in enumerate(sides) if "database" in s], dtype=np.int64)
    else:
        query = database = np.arange(len(paths))
    return Dataset(cfg.name, root, paths, labels, class_names, query, database, excluded)


def _class_folders(root: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """Relative paths of the images under `root`'s class sub-folders, their class names, and
    the image-named files that are not regular files, with why."""
    paths, not_images, excluded = [], [], {}
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            not_images.append(p.relative_to(root).as_posix())
            continue
        why = _not_regular(p)
        if why:
            log.warning("skipping %s: %s", p, why)
            excluded[p.relative_to(root).as_posix()] = why
            continue
        paths.append(p.relative_to(root).as_posix())
    if not_images:
        log.info(
            "skipping %d files without an image suffix under %s (e.g. %s)",
            len(not_images), root, not_images[0],
        )  # fmt: skip
    loose = [p for p in paths if len(Path(p).parts) == 1]
    if loose:
        raise DatasetError(
            f"dataset.root={root} holds {len(loose)} images outside class sub-folders (e.g. "
            f"{loose[0]}): put each class in its own sub-folder, or list the images with "
            "their labels in dataset.manifest=FILE.csv"
        )
    return paths, [Path(p).parts[0] for p in paths], excluded


def _not_regular(path: Path) -> str | None:
    """Why `path` is not a regular file (or a link to one), or None when it is one."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if path.is_symlink():
            return f"broken symlink to {os.readlink(path)} ({err.strerror})"
        return f"cannot be inspected ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    return "not a regular file"


def _read_manifest(path: Path) -> tuple[list[_Row], bool]:
    """The rows of a path,label[,split] CSV, and whether it has the split column."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DatasetError(f"dataset.manifest={path} {what}")
    # utf-8-sig also reads the byte-order mark that Excel's "CSV UTF-8" writes.
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or [])
            records = list(reader)
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"dataset.manifest={path} must be UTF-8, but byte {err.start} is not ({err.reason}); "
            "save it as UTF-8 (in Excel: CSV UTF-8)"
        ) from err
    except OSError as err:
        raise DatasetError(f"dataset.manifest={path} cannot be read: {err.strerror}") from err
    if not {"path", "label"} <= fields:
        raise DatasetError(
            f"dataset.manifest={path} needs columns path,label[,split], got {sorted(fields)}"
        )

    short = [n for n, r in enumerate(records, start=2) if None in r.values() or None in r]
    if short:
        raise DatasetError(
            f"dataset.manifest={path}: row {short[0]} does not have a value for every column "
            f"({len(short)} such rows)"
        )
    has_split = "split" in fields
    rows = [
        _Row(n, _normal_path(r["path"]), r["label"].strip(), r.get("split", "").strip() or None)
        for n, r in enumerate(records, start=2)
    ]
    _check_rows(path, rows, has_split)
    return rows, has_split


def _check_rows(path: Path, rows: list[_Row], has_split: bool) -> None:
    """Refuse empty paths or labels, and split values other than query or database."""
    for column in ("path", "label"):
        empty = [r.number for r in rows if not getattr(r, column)]
        if empty:
            raise DatasetError(
                f"dataset.manifest={path}: row {empty[0]} has an empty {column} ({len(empty)} "
                f"such rows); give every row a {column}"
            )
    bad = sorted({r.split or "" for r in rows if has_split and r.split not in _SIDES})
    if bad:
        raise DatasetError(
            f"the split column of dataset.manifest={path} must be query or database, got {bad}"
        )


def _normal_path(text: str) -> str:
    """A manifest path in the form item ids take, so ``./a//b.png`` and ``a/b.png`` are one."""
    text = text.strip()
    return PurePosixPath(text).as_posix() if text else ""


def _unique_rows(
    manifest: Path, rows: list[_Row]
) -> tuple[list[str], list[str], list[set[str | None]]]:
    """One item per path: its label and the sides it is on (None when there is no split).

    A path may be listed once as a query and once in the database; listed twice on one side,
    or with two labels, it is refused, since a query would find its own copy as a relevant hit.
    """
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.path, []).append(row)
    for path, group in groups.items():
        if len({r.label for r in group}) > 1:
            where = ", ".join(f"{r.label!r} in row {r.number}" for r in group)
            raise DatasetError(
                f"dataset.manifest={manifest} gives {path} more than one label ({where}); "
                "give each image one label"
            )
        for side in {r.split for r in group}:
            numbers = [r.number for r in group if r.split == side]
            if len(numbers) > 1:
                on, once = (f" as {side}", "at most once per side") if side else ("", "once")
                raise DatasetError(
                    f"dataset.manifest={manifest} lists {path}{on} in rows "
                    f"{', '.join(map(str, numbers))}; list each image {once}, or a query finds "
                    "its own copy as a relevant hit"
                )
    paths = list(groups)
    labels = [group[0].label for group in groups.values()]
    sides = [{r.split for r in group} for group in groups.values()]
    return paths, labels, sides


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

    The archive is fetched into the system's temporary folder; `root`'s parent folders are
    created only once it has arrived, so a misspelt path leaves no folders behind.

    NOTE: the two upstream archives (GitHub snapshots at fixed commits) could not be fetched on
    the offline machine this was written on; the unpacking is tested on a local archive.
    """
    _check_creatable(url, root)
    log.info("dataset root %s is missing: fetching %s", root, url)
    with tempfile.TemporaryDirectory() as fetched:
        archive = Path(fetched) / "archive.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as err:
            raise DatasetError(
                f"could not fetch {url} ({err}); download it by hand, or set VISUAL_SEARCH_DATA "
                f"to a folder that already holds '{root.name}'"
            ) from err
        _unpack(archive, url, root, subdir, kind, verify)
    log.info("dataset unpacked into %s", root)


def _check_creatable(url: str, root: Path) -> None:
    """Fail before fetching unless the nearest existing folder above `root` is writable."""
    folder = root.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DatasetError(_cannot_create(url, root, f"{folder} is not a folder"))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DatasetError(_cannot_create(url, root, f"{folder} is not writable"))


def _cannot_create(url: str, root: Path, why: str) -> str:
    return (
        f"cannot create dataset root {root}: {why}. Set VISUAL_SEARCH_DATA (or paths.data=...) "
        f"to a writable folder, or fetch {url} by hand and unpack it as {root}"
    )


def _unpack(
    archive: Path,
    url: str,
    root: Path,
    subdir: str | None,
    kind: DatasetKind,
    verify: Callable[[Path], None] | None,
) -> None:
    """Unpack beside `root` and move into place only once the staged copy passes `verify`."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        unpacking = tempfile.TemporaryDirectory(dir=root.parent)
    except OSError as err:
        where = err.filename or root.parent
        raise DatasetError(_cannot_create(url, root, f"{where}: {err.strerror}")) from err
    with unpacking as tmp:
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
    digest, digests = fingerprint(dataset.root, dataset.items)
    if expected and digest != expected:
        unreadable = sum(d is None for d in digests)
        raise DatasetError(
            f"{dataset.name} at {dataset.root} has content sha256 {digest}, expected {expected} "
            "(dataset.content_sha256): the copy is incomplete or altered"
            + (f"; {unreadable} of its images cannot be read" if unreadable else "")
        )
    return digest
