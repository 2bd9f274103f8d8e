"""Datasets: configs composed by Hydra, the shared real datasets, own images, checksums, fetching.

The real-data tests read ../shared/data and skip when it is absent; everything else builds its
images, manifests and archives in tmp_path.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from visual_search import data, pipeline
from visual_search.config import DatasetKind, Protocol, register_configs
from visual_search.data import Dataset, DatasetError
from visual_search.pipeline import ConfigError, validate

from .conftest import DATA, REPO, needs

CONFIGS = REPO / "configs"
COREL_SUBDIR = "repo-abc/src/cbir/corelDB"
COREL_NUMBERS = [0, 1, 2, 3, 100, 101, 102, 103]


@pytest.fixture(scope="module", autouse=True)
def _schema():
    register_configs()


@pytest.fixture
def config_for(monkeypatch):
    """Compose `configs/config.yaml` with overrides, the data folder set to ../shared/data."""
    monkeypatch.setenv("VISUAL_SEARCH_DATA", str(DATA))

    def run(*overrides: str, config_dir: Path = CONFIGS):
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return run


def _shared(name: str) -> Path:
    root = DATA / name
    if not root.is_dir():
        needs(root)
    return root


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 40, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def _content_sha256(files: dict[str, bytes]) -> str:
    """The manifest rule, written out: sha256 of sorted "<path>  <sha256>" lines joined by \\n."""
    lines = [f"{p}  {hashlib.sha256(b).hexdigest()}" for p, b in sorted(files.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _corel_zip(path: Path) -> dict[str, bytes]:
    """A zip shaped like the Corel source archive; returns the images it should unpack to."""
    images = {f"images/{n}.jpg": _jpeg(n) for n in COREL_NUMBERS}
    with zipfile.ZipFile(path, "w") as z:
        for name, payload in images.items():
            z.writestr(f"{COREL_SUBDIR}/{Path(name).name}", payload)
        z.writestr(f"{COREL_SUBDIR}/logo.jpg", _jpeg(7))  # not a numbered image: left out
        z.writestr(f"{COREL_SUBDIR}/README.md", "Corel")
        z.writestr("repo-abc/README.md", "the repository around it")
    return images


@pytest.fixture
def own_images(tmp_path) -> Path:
    """A folder per class: cat/0..2.png, dog/0.png and dog/1.jpg, plus a file that is no image."""
    root = tmp_path / "own"
    for label, names in {"cat": ["0.png", "1.png", "2.png"], "dog": ["0.png", "1.jpg"]}.items():
        (root / label).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(root / label / name)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def _manifest(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# Every config file composes, and a typo or wrong type fails at compose time.


@pytest.mark.parametrize(
    ("group", "want"),
    [
        ("corel1k", ("corel1k", DatasetKind.corel1k, "corel1k", Protocol.leave_one_out)),
        (
            "grocery_street2shop",
            ("grocery_street2shop", DatasetKind.grocery, "grocery_store", Protocol.street2shop),
        ),
        (
            "grocery_natural",
            ("grocery_natural", DatasetKind.grocery, "grocery_store", Protocol.natural),
        ),
    ],
)
def test_each_shipped_dataset_config_composes(config_for, group, want):
    cfg = config_for(f"dataset={group}")

    name, kind, folder, protocol = want
    assert (cfg.dataset.name, cfg.dataset.kind, cfg.dataset.protocol) == (name, kind, protocol)
    assert cfg.dataset.root == f"{DATA}/{folder}"
    assert cfg.tracking.experiment == f"visual-search-{name}"
    assert cfg.index.factory == "Flat"


def test_grocery_natural_inherits_the_archive_but_not_the_checksum(config_for):
    shop = config_for("dataset=grocery_street2shop").dataset
    natural = config_for("dataset=grocery_natural").dataset

    assert natural.url == shop.url
    assert natural.archive_subdir == shop.archive_subdir
    assert shop.content_sha256 == "169bd364135baa8b228cb396c46affe45fd7335e11d689a6b7f39829d59ca100"
    assert natural.content_sha256 == (
        "c698048dfaca28656147c05ae21689acdc0afeb8425c250451b30db8fa5c5ac8"
    )


def test_the_folder_config_composes_with_a_root(config_for, tmp_path):
    cfg = config_for("dataset=folder", f"dataset.root={tmp_path}")

    assert cfg.dataset.kind is DatasetKind.folder
    assert cfg.dataset.root == str(tmp_path)
    assert cfg.dataset.manifest is None
    assert cfg.dataset.protocol is Protocol.leave_one_out


def test_the_folder_config_leaves_the_root_to_the_user(config_for):
    cfg = config_for("dataset=folder")

    assert OmegaConf.is_missing(cfg.dataset, "root")


@pytest.mark.parametrize(
    ("group", "library", "arch"),
    [("torchvision", "torchvision", "mobilenet_v2"), ("timm", "timm", "mobilenetv2_100")],
)
def test_each_embedder_config_composes(config_for, group, library, arch):
    cfg = config_for(f"embedder={group}")

    assert (cfg.embedder.library, cfg.embedder.arch) == (library, arch)
    assert cfg.embedder.batch_size == 8


@pytest.mark.parametrize(
    "override",
    [
        "dataset.rooot=x",
        "embedder.batch_size=abc",
        "dataset.protocol=bogus",
        "dataset.relevance=medium",
        "dataset.limit_per_class=many",
        "eval.ties=random",
    ],
)
def test_a_misspelt_key_or_wrong_type_fails_at_compose_time(config_for, override):
    key = override.split("=")[0]

    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        config_for(override)


def test_a_misspelt_key_appended_with_plus_is_refused_before_any_compute(config_for):
    # Hydra's '+' lifts the schema's strictness on purpose, so composition accepts the key;
    # validation must still refuse it.
    cfg = config_for("+dataset.rooot=x")
    with pytest.raises(ConfigError, match=r"dataset\.rooot"):
        validate(cfg)


def test_a_misspelt_key_inside_a_config_file_fails_at_compose_time(config_for, tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "dataset" / "typo.yaml").write_text("name: typo\nkind: folder\nrooot: /x\n")

    with pytest.raises(ConfigCompositionException, match="rooot"):
        config_for("dataset=typo", config_dir=configs)


# The shared real datasets: sizes and protocols.


def test_corel1k_is_1000_images_in_10_classes_each_querying_the_rest(config_for):
    _shared("corel1k")

    dataset = data.load_dataset(config_for("dataset=corel1k").dataset)

    assert len(dataset.items) == 1000
    assert dataset.class_names == data.COREL_CLASSES
    assert np.bincount(dataset.labels).tolist() == [100] * 10
    assert dataset.items[:2] == ["images/0.jpg", "images/1.jpg"]
    assert dataset.labels[[0, 99, 100, 999]].tolist() == [0, 0, 1, 9]
    np.testing.assert_array_equal(dataset.query, np.arange(1000))
    np.testing.assert_array_equal(dataset.database, np.arange(1000))
    np.testing.assert_array_equal(dataset.self_positions(), np.arange(1000))


def test_grocery_street2shop_has_one_relevant_iconic_image_per_query(config_for):
    _shared("grocery_store")

    dataset = data.load_dataset(config_for("dataset=grocery_street2shop").dataset)

    assert (len(dataset.query), len(dataset.database)) == (2485, 81)
    assert len(dataset.class_names) == 81
    relevant = dataset.labels[dataset.query][:, None] == dataset.labels[dataset.database][None]
    assert relevant.sum(axis=1).tolist() == [1] * 2485
    assert (dataset.self_positions() == -1).all()
    assert dataset.items[dataset.database[0]] == (
        "dataset/iconic-images-and-descriptions/Fruit/Apple/Golden-Delicious/"
        "Golden-Delicious_Iconic.jpg"
    )


def test_grocery_natural_searches_test_photos_among_train_photos(config_for):
    _shared("grocery_store")

    dataset = data.load_dataset(config_for("dataset=grocery_natural").dataset)

    assert (len(dataset.query), len(dataset.database)) == (2485, 2640)
    assert len(dataset.items) == 2485 + 2640
    assert all(dataset.items[i].startswith("dataset/test/") for i in dataset.query)
    assert all(dataset.items[i].startswith("dataset/train/") for i in dataset.database)
    np.testing.assert_array_equal(dataset.self_positions(), np.full(2485, -1))


def test_coarse_relevance_groups_fine_classes(config_for):
    _shared("grocery_store")

    fine = data.load_dataset(config_for("dataset=grocery_natural").dataset)
    coarse = data.load_dataset(
        config_for("dataset=grocery_natural", "dataset.relevance=coarse").dataset
    )

    assert len(coarse.class_names) == 43
    assert coarse.class_names[:3] == ["Apple", "Avocado", "Banana"]
    apples = [i for i, p in enumerate(coarse.items) if "/Fruit/Apple/" in p]
    assert len(apples) > 0
    assert {coarse.class_names[c] for c in coarse.labels[apples]} == {"Apple"}
    assert {fine.class_names[c] for c in fine.labels[apples]} == {
        "Golden-Delicious", "Granny-Smith", "Pink-Lady", "Red-Delicious", "Royal-Gala",
    }  # fmt: skip
    assert coarse.items == fine.items


def test_limit_per_class_keeps_the_first_three_paths_of_each_class_on_each_side(config_for):
    _shared("corel1k")
    cfg = config_for("dataset=corel1k", "dataset.limit_per_class=3").dataset

    dataset = data.load_dataset(cfg)
    again = data.load_dataset(cfg)

    assert len(dataset.query) == 30
    np.testing.assert_array_equal(dataset.query, dataset.database)
    np.testing.assert_array_equal(dataset.query, again.query)
    assert np.bincount(dataset.labels[dataset.query]).tolist() == [3] * 10
    # "First" is by path, as configs say: images/10.jpg sorts before images/2.jpg.
    assert [dataset.items[i] for i in dataset.query[:3]] == [
        "images/0.jpg", "images/1.jpg", "images/10.jpg",
    ]  # fmt: skip


def test_limit_per_class_on_grocery_natural(config_for):
    _shared("grocery_store")
    cfg = config_for("dataset=grocery_natural", "dataset.limit_per_class=3").dataset

    dataset = data.load_dataset(cfg)

    assert (len(dataset.query), len(dataset.database)) == (243, 243)
    assert np.bincount(dataset.labels[dataset.query]).tolist() == [3] * 81
    assert np.bincount(dataset.labels[dataset.database]).tolist() == [3] * 81
    assert dataset.items[dataset.query[3]] == (
        "dataset/test/Fruit/Apple/Granny-Smith/Granny-Smith_001.jpg"
    )
    np.testing.assert_array_equal(dataset.query, data.load_dataset(cfg).query)


# Own images: a folder per class, or a CSV manifest.


def test_a_folder_per_class_queries_every_image_against_the_rest(config_for, own_images):
    cfg = config_for("dataset=folder", f"dataset.root={own_images}")

    dataset = data.load_dataset(cfg.dataset)

    assert dataset.items == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.jpg"]
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1]
    assert dataset.labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.query, np.arange(5))
    np.testing.assert_array_equal(dataset.self_positions(), np.arange(5))
    assert dataset.root == own_images


def test_a_manifest_with_a_split_column_sets_query_and_database(config_for, own_images, tmp_path):
    manifest = _manifest(
        tmp_path / "manifest.csv",
        "path,label,split\n"
        "cat/0.png,feline,query\n"
        "dog/0.png, canine ,query\n"
        "cat/1.png,feline,database\n"
        "cat/2.png,feline, database\n"
        "dog/1.jpg,canine,database\n",
    )
    cfg = config_for(
        "dataset=folder",
        f"dataset.root={own_images}",
        f"dataset.manifest={manifest}",
        "dataset.protocol=split",
    )

    dataset = data.load_dataset(cfg.dataset)

    assert dataset.items == ["cat/0.png", "dog/0.png", "cat/1.png", "cat/2.png", "dog/1.jpg"]
    assert dataset.class_names == ["canine", "feline"]
    assert dataset.labels.tolist() == [1, 0, 1, 1, 0]
    assert dataset.query.tolist() == [0, 1]
    assert dataset.database.tolist() == [2, 3, 4]
    assert dataset.self_positions().tolist() == [-1, -1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "file,class\ncat/0.png,cat\n",
            r"dataset\.manifest=.*manifest\.csv needs columns path,label\[,split\], "
            r"got \['class', 'file'\]",
        ),
        (
            "path,label,split\ncat/0.png,cat,query\ncat/1.png,cat,test\ndog/0.png,dog,train\n",
            r"split column of dataset\.manifest=.*manifest\.csv must be query or database, "
            r"got \['test', 'train'\]",
        ),
    ],
    ids=["columns", "split-values"],
)
def test_a_bad_manifest_is_refused_with_what_to_fix(
    config_for, own_images, tmp_path, text, message
):
    manifest = _manifest(tmp_path / "manifest.csv", text)
    cfg = config_for("dataset=folder", f"dataset.root={own_images}", f"dataset.manifest={manifest}")

    with pytest.raises(DatasetError, match=message):
        data.load_dataset(cfg.dataset)


def test_a_manifest_row_without_a_split_is_refused(config_for, own_images, tmp_path):
    manifest = _manifest(
        tmp_path / "manifest.csv", "path,label,split\ncat/0.png,cat,query\ncat/1.png,cat\n"
    )
    cfg = config_for(
        "dataset=folder",
        f"dataset.root={own_images}",
        f"dataset.manifest={manifest}",
        "dataset.protocol=split",
    )

    with pytest.raises(DatasetError, match=r"dataset\.manifest=.*row 3 does not have a value"):
        data.load_dataset(cfg.dataset)


def test_a_missing_manifest_names_the_setting(config_for, own_images, tmp_path):
    cfg = config_for(
        "dataset=folder", f"dataset.root={own_images}", f"dataset.manifest={tmp_path}/none.csv"
    )

    with pytest.raises(DatasetError, match=r"dataset\.manifest=.*none\.csv does not exist"):
        data.load_dataset(cfg.dataset)


def test_the_split_protocol_needs_a_manifest(config_for, own_images):
    cfg = config_for("dataset=folder", f"dataset.root={own_images}", "dataset.protocol=split")

    with pytest.raises(DatasetError, match=r"dataset\.protocol=split needs dataset\.manifest"):
        data.load_dataset(cfg.dataset)


def test_a_grocery_protocol_does_not_apply_to_own_images(config_for, own_images):
    cfg = config_for("dataset=folder", f"dataset.root={own_images}", "dataset.protocol=street2shop")

    with pytest.raises(DatasetError, match="use leave_one_out or split"):
        data.load_dataset(cfg.dataset)


# A missing or incomplete copy says where to put it.


def test_a_missing_corel_root_names_visual_search_data(config_for, tmp_path):
    cfg = config_for("dataset=corel1k", f"paths.data={tmp_path}", "dataset.url=null")

    with pytest.raises(DatasetError) as caught:
        data.load_dataset(cfg.dataset)

    message = str(caught.value)
    assert f"dataset root {tmp_path}/corel1k does not exist" in message
    assert "set VISUAL_SEARCH_DATA (or paths.data=...) to the folder holding 'corel1k'" in message
    assert "fetched" not in message
    assert os.listdir(tmp_path) == []


def test_a_missing_folder_root_names_dataset_root(config_for, tmp_path):
    cfg = config_for("dataset=folder", f"dataset.root={tmp_path}/nope")

    with pytest.raises(DatasetError, match=r"nope does not exist\. set dataset\.root=DIR"):
        data.load_dataset(cfg.dataset)


def test_images_listed_but_missing_fail_with_their_count(config_for, tmp_path):
    root = tmp_path / "data" / "corel1k"
    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "class_id", "class_name"])
        for n in range(5):
            writer.writerow([f"images/{n}.jpg", 0, "africa_people"])
    for n in (0, 2, 4):
        (root / "images" / f"{n}.jpg").write_bytes(_jpeg(n))
    cfg = config_for("dataset=corel1k", f"paths.data={tmp_path}/data", "dataset.url=null")

    with pytest.raises(DatasetError) as caught:
        data.load_dataset(cfg.dataset)

    assert "2 of 5 images listed by the manifest are missing" in str(caught.value)
    assert "(images/1.jpg, images/3.jpg)" in str(caught.value)


# Dataset: dropping items.


def _toy() -> Dataset:
    return Dataset(
        name="toy",
        root=Path("/nowhere"),
        items=[f"{i}.png" for i in range(6)],
        labels=np.array([0, 0, 1, 1, 2, 2]),
        class_names=["a", "b", "c"],
        query=np.array([0, 1, 2, 3]),
        database=np.array([2, 3, 4, 5]),
    )


def test_without_drops_items_from_both_sides():
    dataset = _toy()

    kept = dataset.without([2, 5])

    assert kept.query.tolist() == [0, 1, 3]
    assert kept.database.tolist() == [3, 4]
    assert kept.self_positions().tolist() == [-1, -1, 0]
    assert kept.items == dataset.items
    assert dataset.query.tolist() == [0, 1, 2, 3]


def test_used_items_are_the_sorted_union_of_both_sides():
    dataset = _toy()

    assert dataset.used_items().tolist() == [0, 1, 2, 3, 4, 5]
    assert dataset.without([2, 5]).used_items().tolist() == [0, 1, 3, 4]
    assert dataset.self_positions().tolist() == [-1, -1, 0, 1]


# Fingerprints: the manifest.json rule.


def test_fingerprint_reproduces_the_smoke_images_manifest():
    root = _shared("smoke_images")
    manifest = json.loads((root / "manifest.json").read_text())
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert len(files) == manifest["file_count"]

    digest, digests = data.fingerprint(root, files[::-1])

    assert digest == manifest["content_sha256"]
    assert digests == [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in files[::-1]]


def test_fingerprint_changes_with_one_byte(tmp_path):
    files = {"a/one.bin": b"\x00\x01\x02\x03", "b.bin": b"hello"}
    for name, payload in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(payload)

    before, _ = data.fingerprint(tmp_path, list(files))
    (tmp_path / "a" / "one.bin").write_bytes(b"\x00\x01\x02\x04")
    after, _ = data.fingerprint(tmp_path, list(files))

    assert before == _content_sha256(files)
    assert after != before
    assert after == _content_sha256({**files, "a/one.bin": b"\x00\x01\x02\x04"})


def test_fingerprint_of_a_copied_shared_file_changes_with_one_byte(tmp_path):
    root = _shared("smoke_images")
    shutil.copy(root / "sklearn_images_README.txt", tmp_path / "sklearn_images_README.txt")
    items = ["sklearn_images_README.txt"]
    assert data.fingerprint(tmp_path, items) == data.fingerprint(root, items)

    payload = bytearray((tmp_path / items[0]).read_bytes())
    payload[0] ^= 1
    (tmp_path / items[0]).write_bytes(bytes(payload))

    assert data.fingerprint(tmp_path, items)[0] != data.fingerprint(root, items)[0]


# Fetching: a local archive stands in for the upstream one.


def test_download_unpacks_a_corel_archive_with_labels(tmp_path):
    archive = tmp_path / "corel.zip"
    images = _corel_zip(archive)
    root = tmp_path / "corel1k"

    data.download(archive.as_uri(), root, COREL_SUBDIR, DatasetKind.corel1k)

    assert sorted(os.listdir(root)) == ["images", "labels.csv"]
    assert sorted(os.listdir(root / "images")) == sorted(Path(n).name for n in images)
    assert all((root / name).read_bytes() == payload for name, payload in images.items())
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["filename", "class_id", "class_name"],
        *([f"images/{n}.jpg", "0", "africa_people"] for n in (0, 1, 2, 3)),
        *([f"images/{n}.jpg", "1", "beaches"] for n in (100, 101, 102, 103)),
    ]
    assert sorted(os.listdir(tmp_path)) == ["corel.zip", "corel1k"]


def test_download_of_another_kind_moves_the_subfolder_into_place(tmp_path):
    archive = tmp_path / "grocery.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("Repo-123/dataset/classes.csv", "header\n")
        z.writestr("Repo-123/README.md", "readme")
    root = tmp_path / "grocery_store"

    data.download(archive.as_uri(), root, "Repo-123", DatasetKind.grocery)

    assert sorted(os.listdir(root)) == ["README.md", "dataset"]
    assert (root / "dataset" / "classes.csv").read_text() == "header\n"


def test_an_unreachable_url_names_visual_search_data_and_leaves_nothing(tmp_path):
    root = tmp_path / "data" / "corel1k"

    with pytest.raises(DatasetError) as caught:
        data.download("file:///nonexistent.zip", root, None, DatasetKind.corel1k)

    message = str(caught.value)
    assert message.startswith("could not fetch file:///nonexistent.zip")
    assert "set VISUAL_SEARCH_DATA to a folder that already holds 'corel1k'" in message
    assert not (tmp_path / "data").exists()  # a misspelt path leaves no folders behind


def _fetching(config_for, tmp_path: Path, archive: Path, checksum: str):
    return config_for(
        "dataset=corel1k",
        f"paths.data={tmp_path}/data",
        f"dataset.url={archive.as_uri()}",
        f"dataset.archive_subdir={COREL_SUBDIR}",
        f"dataset.content_sha256={checksum}",
    ).dataset


def test_load_dataset_fetches_a_missing_root_and_checks_its_content(config_for, tmp_path):
    archive = tmp_path / "corel.zip"
    images = _corel_zip(archive)
    cfg = _fetching(config_for, tmp_path, archive, _content_sha256(images))

    dataset = data.load_dataset(cfg)

    assert dataset.root == tmp_path / "data" / "corel1k"
    assert dataset.items == [f"images/{n}.jpg" for n in COREL_NUMBERS]
    assert dataset.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    np.testing.assert_array_equal(dataset.self_positions(), np.arange(8))


def test_a_fetched_copy_with_the_wrong_checksum_is_refused(config_for, tmp_path):
    archive = tmp_path / "corel.zip"
    images = _corel_zip(archive)
    wrong = "deadbeef" * 8
    cfg = _fetching(config_for, tmp_path, archive, wrong)

    with pytest.raises(DatasetError) as caught:
        data.load_dataset(cfg)

    assert f"has content sha256 {_content_sha256(images)}, expected {wrong}" in str(caught.value)


def test_a_copy_refused_for_its_checksum_is_not_trusted_on_the_next_run(config_for, tmp_path):
    archive = tmp_path / "corel.zip"
    _corel_zip(archive)
    cfg = _fetching(config_for, tmp_path, archive, "deadbeef" * 8)
    with pytest.raises(DatasetError):
        data.load_dataset(cfg)

    with pytest.raises(DatasetError):
        data.load_dataset(cfg)


def test_images_outside_class_folders_are_refused(config_for, tmp_path):
    # A flat folder would make every image one class with an empty name, and mAP 1.0.
    root = tmp_path / "flat"
    root.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(root / name)
    cfg = config_for("dataset=folder", f"dataset.root={root}")
    with pytest.raises(
        DatasetError, match=r"2 images outside class sub-folders.*dataset\.manifest"
    ):
        data.load_dataset(cfg.dataset)


# An image is one item however many rows list it: a query must never find its own copy.


def _split_config(config_for, own_images, manifest: Path, protocol: str = "split"):
    return config_for(
        "dataset=folder",
        f"dataset.root={own_images}",
        f"dataset.manifest={manifest}",
        f"dataset.protocol={protocol}",
    ).dataset


def test_an_image_listed_as_query_and_as_database_is_one_item_on_both_sides(
    config_for, own_images, tmp_path
):
    manifest = _manifest(
        tmp_path / "manifest.csv",
        "path,label,split\n"
        "cat/0.png,cat,database\n"
        "cat/1.png,cat,query\n"
        "./cat/0.png,cat,query\n"
        "dog/0.png,dog,database\n",
    )

    dataset = data.load_dataset(_split_config(config_for, own_images, manifest))

    assert dataset.items == ["cat/0.png", "cat/1.png", "dog/0.png"]
    assert dataset.query.tolist() == [0, 1]
    assert dataset.database.tolist() == [0, 2]
    assert dataset.self_positions().tolist() == [0, -1]


@pytest.mark.parametrize(
    ("rows", "protocol", "message"),
    [
        (
            "cat/0.png,cat,query\ncat/1.png,cat,database\ncat/0.png,cat,query\n",
            "split",
            r"lists cat/0\.png as query in rows 2, 4; list each image at most once per side",
        ),
        (
            "cat/0.png,cat,query\ncat/1.png,cat,database\ncat//0.png,dog,database\n",
            "split",
            r"gives cat/0\.png more than one label \('cat' in row 2, 'dog' in row 4\)",
        ),
    ],
    ids=["same-side", "two-labels"],
)
def test_an_image_listed_twice_in_a_split_manifest_is_refused_with_its_rows(
    config_for, own_images, tmp_path, rows, protocol, message
):
    manifest = _manifest(tmp_path / "manifest.csv", "path,label,split\n" + rows)

    with pytest.raises(DatasetError, match=r"dataset\.manifest=.*manifest\.csv " + message):
        data.load_dataset(_split_config(config_for, own_images, manifest, protocol))


def test_an_image_listed_twice_in_a_leave_one_out_manifest_is_refused(
    config_for, own_images, tmp_path
):
    manifest = _manifest(
        tmp_path / "manifest.csv", "path,label\ncat/0.png,cat\ndog/0.png,dog\ncat/0.png,cat\n"
    )
    cfg = config_for("dataset=folder", f"dataset.root={own_images}", f"dataset.manifest={manifest}")

    with pytest.raises(
        DatasetError,
        match=r"manifest\.csv lists cat/0\.png in rows 2, 4; list each image once, or a query "
        r"finds its own copy",
    ):
        data.load_dataset(cfg.dataset)


@pytest.mark.parametrize(
    ("rows", "side"),
    [
        ("cat/0.png,cat,query\ndog/0.png,dog,query\n", "database"),
        ("cat/0.png,cat,database\ndog/0.png,dog,database\n", "query"),
    ],
)
def test_a_split_manifest_with_an_empty_side_is_refused(
    config_for, own_images, tmp_path, rows, side
):
    manifest = _manifest(tmp_path / "manifest.csv", "path,label,split\n" + rows)

    with pytest.raises(DatasetError, match=rf"no {side} images .*dataset\.manifest=.*split={side}"):
        data.load_dataset(_split_config(config_for, own_images, manifest))


def test_the_split_protocol_needs_a_split_column(config_for, own_images, tmp_path):
    manifest = _manifest(tmp_path / "manifest.csv", "path,label\ncat/0.png,cat\n")

    with pytest.raises(DatasetError, match=r"needs a split column in dataset\.manifest="):
        data.load_dataset(_split_config(config_for, own_images, manifest))


# Manifests as spreadsheets write them.


def test_a_manifest_with_a_byte_order_mark_is_read(config_for, own_images, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes("path,label\r\ncat/0.png,cat\r\ndog/0.png,dog\r\n".encode("utf-8-sig"))
    cfg = config_for("dataset=folder", f"dataset.root={own_images}", f"dataset.manifest={manifest}")

    dataset = data.load_dataset(cfg.dataset)

    assert dataset.items == ["cat/0.png", "dog/0.png"]
    assert dataset.class_names == ["cat", "dog"]


def test_a_manifest_that_is_not_utf8_is_refused(config_for, own_images, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes("path,label\ncat/0.png,félin\n".encode("latin-1"))
    cfg = config_for("dataset=folder", f"dataset.root={own_images}", f"dataset.manifest={manifest}")

    with pytest.raises(DatasetError, match=r"dataset\.manifest=.*manifest\.csv must be UTF-8"):
        data.load_dataset(cfg.dataset)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("cat/0.png,cat\ndog/0.png, \n", r"row 3 has an empty label \(1 such rows\)"),
        ("cat/0.png,cat\n,dog\n", r"row 3 has an empty path"),
    ],
    ids=["label", "path"],
)
def test_a_manifest_row_with_an_empty_value_is_refused(
    config_for, own_images, tmp_path, rows, message
):
    manifest = _manifest(tmp_path / "manifest.csv", "path,label\n" + rows)
    cfg = config_for("dataset=folder", f"dataset.root={own_images}", f"dataset.manifest={manifest}")

    with pytest.raises(DatasetError, match=r"dataset\.manifest=.*manifest\.csv: " + message):
        data.load_dataset(cfg.dataset)


# Settings that are out of range or do not apply fail before anything is read.


def test_a_root_that_is_a_file_is_not_a_folder(config_for, tmp_path):
    root = tmp_path / "images.zip"
    root.write_bytes(b"PK")
    cfg = config_for("dataset=folder", f"dataset.root={root}")

    with pytest.raises(DatasetError, match=r"images\.zip is not a folder\. set dataset\.root=DIR"):
        data.load_dataset(cfg.dataset)


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_per_class_below_one_is_refused(config_for, tmp_path, limit):
    cfg = config_for("dataset=folder", f"dataset.root={tmp_path}/nope")
    cfg.dataset.limit_per_class = limit

    with pytest.raises(
        DatasetError, match=rf"dataset\.limit_per_class must be >= 1, or null .*; got {limit}$"
    ):
        data.load_dataset(cfg.dataset)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["dataset=corel1k", "dataset.protocol=split"],
            "dataset.protocol=split does not apply to dataset.kind=corel1k; use leave_one_out",
        ),
        (
            ["dataset=corel1k", "dataset.protocol=natural"],
            "dataset.protocol=natural does not apply to dataset.kind=corel1k; use leave_one_out",
        ),
        (
            ["dataset=folder", "dataset.protocol=street2shop"],
            "dataset.protocol=street2shop does not apply to dataset.kind=folder; "
            "use leave_one_out or split",
        ),
        (
            ["dataset=grocery_natural", "dataset.protocol=leave_one_out"],
            "dataset.protocol=leave_one_out does not apply to dataset.kind=grocery; "
            "use street2shop or natural",
        ),
        (
            ["dataset=corel1k", "dataset.relevance=coarse"],
            "dataset.relevance=coarse does not apply to dataset.kind=corel1k, which has no "
            "coarse classes; use fine",
        ),
        (
            ["dataset=folder", "dataset.relevance=coarse"],
            "dataset.relevance=coarse does not apply to dataset.kind=folder, which has no "
            "coarse classes; use fine",
        ),
    ],
)
def test_a_setting_that_does_not_apply_is_refused_before_anything_is_read(
    config_for, tmp_path, overrides, message
):
    # The root is absent and the URL unreachable: only the settings can be at fault.
    cfg = config_for(
        *overrides,
        f"paths.data={tmp_path}",
        f"dataset.root={tmp_path}/absent",
        "dataset.url=file:///nonexistent.zip",
    )

    with pytest.raises(DatasetError) as caught:
        data.load_dataset(cfg.dataset)

    assert str(caught.value) == message
    assert os.listdir(tmp_path) == []


# Files that are not regular images, or cannot be read.


def test_non_regular_files_in_class_folders_are_skipped_with_a_warning(
    config_for, own_images, caplog
):
    (own_images / "cat" / "3.png").symlink_to(own_images / "cat" / "gone.png")
    os.mkfifo(own_images / "dog" / "2.jpg")
    cfg = config_for("dataset=folder", f"dataset.root={own_images}")

    with caplog.at_level("WARNING", logger="visual_search.data"):
        dataset = data.load_dataset(cfg.dataset)

    assert dataset.items == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.jpg"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert f"{own_images}/cat/3.png: broken symlink to {own_images}/cat/gone.png" in warnings[0]
    assert f"{own_images}/dog/2.jpg: a named pipe (FIFO)" in warnings[1]
    # They reach the run's skipped.csv and n_skipped with the rest.
    assert dataset.excluded == {
        "cat/3.png": f"broken symlink to {own_images}/cat/gone.png (No such file or directory)",
        "dog/2.jpg": "a named pipe (FIFO), not a regular file",
    }
    assert pipeline.hash_images(dataset).skipped == dataset.excluded


def test_fingerprint_gives_no_digest_for_a_file_it_cannot_read(tmp_path, caplog):
    files = {"a.bin": b"hello", "c.bin": b"world"}
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
    (tmp_path / "b.bin").symlink_to(tmp_path / "gone.bin")
    (tmp_path / "d.bin").mkdir()

    with caplog.at_level("WARNING", logger="visual_search.data"):
        digest, digests = data.fingerprint(tmp_path, ["a.bin", "b.bin", "c.bin", "d.bin"])

    assert digest == _content_sha256(files)
    assert digests == [
        hashlib.sha256(b"hello").hexdigest(),
        None,
        hashlib.sha256(b"world").hexdigest(),
        None,
    ]
    warnings = [r.getMessage() for r in caplog.records]
    assert f"cannot read {tmp_path}/b.bin (No such file or directory)" in warnings[0]
    assert f"cannot read {tmp_path}/d.bin (Is a directory)" in warnings[1]


def test_fingerprint_gives_no_digest_for_a_file_without_read_permission(tmp_path, monkeypatch):
    (tmp_path / "a.bin").write_bytes(b"hello")
    (tmp_path / "b.bin").write_bytes(b"secret")
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if Path(path).name == "b.bin":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    digest, digests = data.fingerprint(tmp_path, ["a.bin", "b.bin"])

    assert digests == [hashlib.sha256(b"hello").hexdigest(), None]
    assert digest == _content_sha256({"a.bin": b"hello"})


# Fetching into a folder that cannot be written.


def test_download_into_a_read_only_folder_names_it_and_fetches_nothing(tmp_path, monkeypatch):
    archive = tmp_path / "corel.zip"
    _corel_zip(archive)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(data.os, "access", lambda path, mode: Path(path) != tmp_path / "data")
    monkeypatch.setattr(data.urllib.request, "urlopen", pytest.fail)

    with pytest.raises(DatasetError) as caught:
        data.download(
            archive.as_uri(), tmp_path / "data" / "x" / "corel1k", None, DatasetKind.corel1k
        )

    message = str(caught.value)
    assert message.startswith(f"cannot create dataset root {tmp_path}/data/x/corel1k: ")
    assert f"{tmp_path}/data is not writable" in message
    assert "Set VISUAL_SEARCH_DATA (or paths.data=...) to a writable folder" in message
    assert f"or fetch {archive.as_uri()} by hand" in message
    assert os.listdir(tmp_path / "data") == []


def test_download_under_a_file_names_it(tmp_path):
    archive = tmp_path / "corel.zip"
    _corel_zip(archive)

    with pytest.raises(DatasetError, match=rf"{tmp_path}/corel\.zip is not a folder"):
        data.download(archive.as_uri(), archive / "corel1k", None, DatasetKind.corel1k)


def test_a_parent_that_cannot_be_made_after_fetching_is_a_dataset_error(tmp_path, monkeypatch):
    archive = tmp_path / "corel.zip"
    _corel_zip(archive)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(data.Path, "mkdir", refuse)
    with pytest.raises(DatasetError, match=r"data: Permission denied\. Set VISUAL_SEARCH_DATA"):
        data.download(archive.as_uri(), tmp_path / "data" / "corel1k", None, DatasetKind.corel1k)


def test_download_creates_missing_parents_once_the_archive_has_arrived(tmp_path):
    archive = tmp_path / "corel.zip"
    images = _corel_zip(archive)
    root = tmp_path / "a" / "b" / "corel1k"

    data.download(archive.as_uri(), root, COREL_SUBDIR, DatasetKind.corel1k)

    assert sorted(os.listdir(root / "images")) == sorted(Path(n).name for n in images)
    assert os.listdir(root.parent) == ["corel1k"]
