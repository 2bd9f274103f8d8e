"""Artifact keys, atomic writes and the content-addressed vector store."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from visual_search import cache
from visual_search.cache import VectorStore, key, write_atomic

PRODUCER = {"arch": "mobilenet_v2", "weights": "IMAGENET1K_V1", "size": 224}


# key: a short hash of the canonical JSON.


def test_key_is_the_sha256_of_the_canonical_json():
    canonical = '{"a":1,"b":[1,2],"c":{"x":"y"}}'
    want = hashlib.sha256(canonical.encode()).hexdigest()[:20]

    assert key({"c": {"x": "y"}, "b": [1, 2], "a": 1}) == want


def test_key_does_not_depend_on_key_order_at_any_depth():
    one = {"model": {"arch": "a", "size": 224}, "roi": None, "dataset": "corel1k"}
    two = {"dataset": "corel1k", "roi": None, "model": {"size": 224, "arch": "a"}}

    assert key(one) == key(two)


@pytest.mark.parametrize(
    "changed",
    [
        {"arch": "resnet50"},
        {"weights": "IMAGENET1K_V2"},
        {"size": 256},
        {"size": "224"},
        {"size": 224.5},
        {"extra": None},
    ],
)
def test_key_changes_with_any_value(changed):
    assert key({**PRODUCER, **changed}) != key(PRODUCER)


def test_key_of_a_list_depends_on_its_order():
    assert key({"hashes": ["a", "b"]}) != key({"hashes": ["b", "a"]})


# write_atomic: through a temporary file, never a half-written artifact.


def test_write_atomic_writes_the_bytes_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "deep" / "er" / "metrics.json"

    write_atomic(path, b"first")
    write_atomic(path, b"second")

    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["metrics.json"]


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "index.faiss"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", refuse)

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["index.faiss"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "rankings.csv"
    path.write_bytes(b"old")

    with pytest.raises(TypeError):
        write_atomic(path, object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["rankings.csv"]


def test_an_interrupted_write_is_cleaned_up_too(tmp_path, monkeypatch):
    path = tmp_path / "embeddings.npy"

    def interrupt(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.os, "replace", interrupt)

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"data")
    assert os.listdir(tmp_path) == []


def test_write_json_is_sorted_and_readable(tmp_path):
    path = tmp_path / "m.json"

    cache.write_json(path, {"b": 1, "a": [1, 2]})

    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')


# VectorStore: rows addressed by content hash, one shard per put.


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_get_after_two_puts_returns_found_rows_in_input_order(tmp_path):
    store = VectorStore(tmp_path / "store", PRODUCER)
    first, second = _rows(2, seed=0), _rows(1, seed=1)
    store.put(["h0", "h1"], first)
    store.put(["h2"], second)

    found, vectors = store.get(["h2", "missing", "h0", "h1"])

    assert found.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(vectors, np.stack([second[0], first[0], first[1]]))
    assert vectors.dtype == np.float32


def test_get_of_only_missing_hashes_gives_no_vectors(tmp_path):
    store = VectorStore(tmp_path / "store", PRODUCER)
    store.put(["h0"], _rows(1, seed=2))

    found, vectors = store.get(["x", "y"])

    assert found.tolist() == [False, False]
    assert found.dtype == bool
    assert vectors is None


def test_an_empty_store_finds_nothing(tmp_path):
    found, vectors = VectorStore(tmp_path / "store", PRODUCER).get(["h0"])

    assert found.tolist() == [False]
    assert vectors is None


def test_a_new_store_on_the_same_directory_sees_earlier_shards(tmp_path):
    rows = _rows(3, seed=3)
    VectorStore(tmp_path / "store", PRODUCER).put(["a", "b", "c"], rows)

    found, vectors = VectorStore(tmp_path / "store", PRODUCER).get(["c", "a"])

    assert found.tolist() == [True, True]
    np.testing.assert_array_equal(vectors, rows[[2, 0]])


def test_each_put_adds_one_shard_numpy_reads_alone(tmp_path):
    store = VectorStore(tmp_path / "store", PRODUCER)
    rows = _rows(2, seed=4)
    store.put(["a", "b"], rows)
    store.put(["c"], _rows(1, seed=5))
    store.put([], np.empty((0, 4), dtype=np.float32))

    shards = sorted((tmp_path / "store").glob("shard-*.npz"))

    assert len(shards) == 2
    assert sorted(os.listdir(tmp_path / "store")) == sorted(
        ["producer.json", *(p.name for p in shards)]
    )
    with np.load(tmp_path / "store" / f"shard-{key({'hashes': ['a', 'b']})}.npz") as z:
        assert z["hashes"].tolist() == ["a", "b"]
        np.testing.assert_array_equal(z["vectors"], rows)


def test_producer_json_is_written_once(tmp_path):
    directory = tmp_path / "store"
    VectorStore(directory, PRODUCER)
    written = (directory / "producer.json").read_bytes()

    VectorStore(directory, {**PRODUCER, "arch": "something else"})

    assert (directory / "producer.json").read_bytes() == written
    assert json.loads(written) == PRODUCER


def test_written_files_follow_the_umask_not_mkstemp_privacy(tmp_path):
    old = os.umask(0o022)
    try:
        cache.write_atomic(tmp_path / "m.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
