"""FAISS indexes: the shared vector cases, normalisation, and exact search against an oracle."""

from __future__ import annotations

import re

import faiss
import numpy as np
import pytest

from visual_search.index import build, normalise, search

from .conftest import CASES, needs

VECTORS = CASES / "case07_faiss_vectors"


def _vectors(name: str) -> np.ndarray:
    path = VECTORS / name
    if not path.is_file():
        needs(path)
    return np.load(path)


def _random(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _oracle(database: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of every query to every database row, in float64, best first."""
    xb = database / np.linalg.norm(database, axis=1, keepdims=True)
    xq = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = xq.astype(np.float64) @ xb.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, ids, axis=1), ids


# The shared case: unnormalised vectors, float64 Fortran input, a database smaller than k.


def test_cosine_case_ranks_by_angle_not_by_raw_inner_product():
    database = _vectors("cosine_db_3x4_unnormalised.npy")
    query = _vectors("cosine_query_1x4.npy")

    scores, ids = search(build(database), query, k=3)

    assert ids.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0]], atol=1e-6)
    assert scores.dtype == np.float32
    assert ids.dtype == np.int64


def test_float64_fortran_embeddings_give_the_same_results_as_float32_c_order():
    raw = _vectors("emb_50x1280_float64_fortran.npy")
    assert raw.dtype == np.float64 and raw.flags.f_contiguous and not raw.flags.c_contiguous
    cast = np.ascontiguousarray(raw, dtype=np.float32)

    scores_raw, ids_raw = search(build(raw), raw[:10], k=5)
    scores_cast, ids_cast = search(build(cast), cast[:10], k=5)

    np.testing.assert_array_equal(ids_raw, ids_cast)
    np.testing.assert_allclose(scores_raw, scores_cast, atol=1e-6)
    assert ids_raw[:, 0].tolist() == list(range(10))
    np.testing.assert_allclose(scores_raw[:, 0], np.ones(10), atol=1e-6)


def test_k_beyond_the_database_returns_only_real_hits():
    database = _vectors("tiny_db_3x1280_normalised.npy")

    scores, ids = search(build(database), database, k=10)

    assert ids.shape == (3, 3)
    assert scores.shape == (3, 3)
    assert (ids >= 0).all()
    assert np.isfinite(scores).all()
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert sorted(map(sorted, ids.tolist())) == [[0, 1, 2]] * 3
    np.testing.assert_allclose(scores[:, 0], np.ones(3), atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


# normalise: the one L2 normalisation every path uses.


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x.astype(np.float64), id="float64"),
        pytest.param(lambda x: np.asfortranarray(x), id="fortran"),
        pytest.param(lambda x: np.repeat(x, 2, axis=1)[:, ::2], id="strided-columns"),
        pytest.param(lambda x: np.repeat(x, 2, axis=0)[::2], id="strided-rows"),
    ],
)
def test_normalise_gives_unit_float32_c_contiguous_rows(make):
    x = _random(6, 5, seed=1)
    given = make(x)
    assert given.dtype != np.float32 or not given.flags.c_contiguous

    out = normalise(given)

    assert out.shape == (6, 5)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.ones(6), atol=1e-6)
    np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)


def test_normalise_turns_one_vector_into_one_row():
    out = normalise(np.array([3.0, 0.0, 4.0]))

    assert out.shape == (1, 3)
    np.testing.assert_allclose(out, [[0.6, 0.0, 0.8]], atol=1e-7)


def test_normalise_keeps_a_zero_row_zero():
    out = normalise(np.array([[0.0, 0.0], [0.0, 2.0]]))

    assert not np.isnan(out).any()
    assert out.tolist() == [[0.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_normalise_refuses_non_finite_values(bad):
    x = np.ones((2, 3))
    x[1, 2] = bad

    with pytest.raises(ValueError, match="NaN or infinite"):
        normalise(x)


def test_normalise_refuses_three_dimensional_input():
    with pytest.raises(ValueError, match=r"must be \(n, d\), got shape \(2, 3, 4\)"):
        normalise(np.ones((2, 3, 4)))


# search: the query itself, argument checks, and exact search against a brute-force oracle.


def test_exclude_drops_each_query_itself_and_moves_the_rest_up():
    database = _random(20, 8, seed=2)
    built = build(database)
    scores_all, ids_all = search(built, database, k=6)
    assert ids_all[:, 0].tolist() == list(range(20))

    scores, ids = search(built, database, k=5, exclude=np.arange(20))

    assert ids.shape == (20, 5)
    assert not (ids == np.arange(20)[:, None]).any()
    np.testing.assert_array_equal(ids, ids_all[:, 1:])
    np.testing.assert_array_equal(scores, scores_all[:, 1:])


def test_exclude_minus_one_leaves_that_query_untouched():
    database = _random(20, 8, seed=3)
    built = build(database)
    exclude = np.array([0, -1, 2])

    scores, ids = search(built, database[:3], k=4, exclude=exclude)
    _, plain = search(built, database[:3], k=5)

    assert ids[0].tolist() == plain[0, 1:].tolist()
    assert ids[1].tolist() == plain[1, :4].tolist()
    assert ids[2].tolist() == plain[2, 1:].tolist()


def test_rows_with_fewer_hits_end_in_minus_one_when_others_are_full():
    # NOTE: search's docstring says no -1 id is ever returned; the code (and its inline comment)
    # pads a row that lost its own id when another row kept the whole database. This pins the
    # behaviour callers (metrics.rank_relevance, pipeline._pad) are written for.
    database = _random(3, 4, seed=4)

    scores, ids = search(build(database), database[:2], k=10, exclude=np.array([0, -1]))

    assert ids.shape == (2, 3)
    assert ids[0, 2] == -1
    assert scores[0, 2] == -np.inf
    assert sorted(ids[0, :2].tolist()) == [1, 2]
    assert sorted(ids[1].tolist()) == [0, 1, 2]
    assert np.isfinite(scores[1]).all()


def _four_lists() -> tuple[faiss.Index, np.ndarray, list[list[int]]]:
    """An IVF index whose 4 lists hold 3, 5, 7 and 9 vectors; nprobe=1 sees one list."""
    centres = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
    sizes = [3, 5, 7, 9]
    rng = np.random.default_rng(13)
    database = np.vstack(
        [c + 0.05 * rng.standard_normal((n, 2)) for c, n in zip(centres, sizes, strict=True)]
    )
    quantizer = faiss.IndexFlatIP(2)
    quantizer.add(centres)
    ivf = faiss.IndexIVFFlat(quantizer, 2, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained = True  # the centroids are given, not learnt
    ivf.add(normalise(database))
    starts = np.cumsum([0, *sizes])
    return ivf, database, [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_short_approximate_results_are_cut_to_the_widest_row_and_padded_at_the_end():
    ivf, database, lists = _four_lists()
    first = [members[0] for members in lists]

    scores, ids = search(ivf, database[first], k=20)

    assert ids.shape == (4, 9)
    assert [sorted(row[row >= 0].tolist()) for row in ids] == lists
    assert [int((row >= 0).sum()) for row in ids] == [3, 5, 7, 9]
    for row_ids, row_scores, n in zip(ids, scores, [3, 5, 7, 9], strict=True):
        assert (row_ids[n:] == -1).all()
        assert np.isfinite(row_scores[:n]).all()
        assert (row_scores[n:] == -np.inf).all()


def test_short_approximate_results_with_exclude_lose_only_the_query_itself():
    ivf, database, lists = _four_lists()
    first = [members[0] for members in lists]

    scores, ids = search(ivf, database[first], k=20, exclude=np.array(first))

    assert ids.shape == (4, 8)
    assert [sorted(row[row >= 0].tolist()) for row in ids] == [m[1:] for m in lists]
    assert [int(np.isfinite(row).sum()) for row in scores] == [2, 4, 6, 8]


@pytest.mark.parametrize("k", [0, -1])
def test_k_must_be_positive(k):
    built = build(_random(5, 4, seed=5))

    with pytest.raises(ValueError, match=f"k must be positive, got {k}"):
        search(built, _random(1, 4, seed=6), k=k)


def test_queries_of_another_dimension_are_refused():
    built = build(_random(5, 4, seed=7))

    with pytest.raises(ValueError, match="queries have dimension 3, the index 4"):
        search(built, _random(2, 3, seed=8), k=1)


@pytest.mark.parametrize("factory", ["NotAnIndex", "", "IVF,Flat", "Flat,Flat"])
def test_an_invalid_factory_string_names_the_setting(factory):
    message = f"index.factory={factory!r} is not a valid FAISS factory string"

    with pytest.raises(ValueError, match=re.escape(message)):
        build(_random(10, 4, seed=9), factory)


def test_flat_search_matches_a_brute_force_oracle_where_scores_are_not_tied():
    database = _random(300, 32, seed=10)
    queries = _random(25, 32, seed=11)
    k = 10

    scores, ids = search(build(database), queries, k=k)
    want_scores, want_ids = _oracle(database, queries)

    np.testing.assert_allclose(scores, want_scores[:, :k], atol=1e-5)
    # A rank is decided when its oracle score is apart from both neighbours (k+1-th included).
    gap = np.diff(want_scores[:, : k + 1], axis=1) < -1e-5
    decided = np.ones((len(queries), k), dtype=bool)
    decided[:, 1:] &= gap[:, : k - 1]
    decided &= gap[:, :k]
    assert decided.sum() > 0.9 * decided.size
    np.testing.assert_array_equal(ids[decided], want_ids[:, :k][decided])


def test_tied_database_rows_are_all_returned_whatever_their_order():
    base = _random(30, 16, seed=12)
    database = np.vstack([base, base[:5]])  # ids 30..34 duplicate 0..4: exact ties
    queries = base[:5]

    scores, ids = search(build(database), queries, k=2)

    assert [sorted(row) for row in ids.tolist()] == [[i, 30 + i] for i in range(5)]
    np.testing.assert_allclose(scores, np.ones((5, 2)), atol=1e-6)


# --- every index type against the exact oracle, validation, build and search settings ----------

INDEX_TYPES = {
    "IVF8,Flat": {"nprobe": 8},
    "IVF8,PQ16x8np": {"nprobe": 8},
    "HNSW16": {"efSearch": 256},
    "SQ8": {},
    "PQ16x8np": {},
    "OPQ16,IVF8,PQ16x8np": {"nprobe": 8},
    "IVF8_HNSW8,Flat": {"nprobe": 8},
}


def _clustered(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    """Unit vectors around a few centres, like embeddings of a few classes."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, d))
    return normalise(means[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, d)))


@pytest.mark.parametrize("factory", list(INDEX_TYPES))
def test_each_index_type_finds_the_exact_neighbours(factory, tmp_path):
    from visual_search import metrics
    from visual_search.index import build_cached, set_search_params

    xb, xq = _clustered(1200, 32, 8, seed=1), _clustered(50, 32, 8, seed=2)
    exact_scores, exact_ids = search(build(xb), xq, 10)
    built, _, _, _ = build_cached(xb, factory, tmp_path)
    set_search_params(built, INDEX_TYPES[factory])  # every list probed / a deep graph search
    _, ids = search(built, xq, 10)
    scores = np.einsum("qd,qkd->qk", xq, xb[ids])
    recall = metrics.neighbour_recall(ids, exact_ids, exact_scores, scores, k=10)
    # Full-vector indexes searched exhaustively are exact; quantised ones come close.
    floor = 0.99 if "PQ" not in factory and "SQ" not in factory else 0.6
    assert recall >= floor, (factory, recall)


def test_a_cached_index_is_loaded_not_rebuilt(tmp_path):
    from visual_search.index import build_cached

    xb = _clustered(500, 16, 4, seed=3)
    first, path, seconds, cached = build_cached(xb, "IVF4,Flat", tmp_path)
    again, path_again, seconds_again, cached_again = build_cached(xb, "IVF4,Flat", tmp_path)
    assert seconds_again == seconds > 0  # the build's own time, not the load's
    assert (cached, cached_again, path) == (False, True, path_again)
    assert again.ntotal == first.ntotal == 500
    _, other_path, _, _ = build_cached(xb, "IVF8,Flat", tmp_path)
    assert other_path != path


def test_hnsw_build_depth_is_applied(tmp_path):
    from visual_search.index import _find_hnsw, build_cached

    built, _, _, _ = build_cached(_clustered(100, 8, 2, seed=4), "HNSW8", tmp_path,
                               {"efConstruction": 77})  # fmt: skip
    assert _find_hnsw(built).efConstruction == 77
    with pytest.raises(ValueError, match="efConstruction"):
        build_cached(_clustered(100, 8, 2, seed=4), "Flat", tmp_path / "x", {"efConstruction": 9})


def test_search_settings_that_do_not_apply_are_refused():
    from visual_search.index import set_search_params

    with pytest.raises(ValueError, match="index.search_grid: nprobe=4"):
        set_search_params(build(_random(20, 4, seed=5), "HNSW8"), {"nprobe": 4})


def test_too_many_lists_for_the_training_vectors_is_refused_before_faiss():
    from visual_search.index import validate

    train = _vectors("ivf_train_175x1280.npy")
    with pytest.raises(
        ValueError,
        match=r"nlist=500 needs at least 500 training vectors, got 175; lower index\.nlist",
    ):
        build(train, "IVF500,Flat")
    warnings = validate("IVF16,Flat", 1280, 175)
    assert warnings and "10.9 per list" in warnings[0] and "39" in warnings[0]


def test_pq_sub_quantizers_must_divide_the_dimension():
    from visual_search.index import validate

    train = _vectors("ivf_train_175x1280.npy")
    with pytest.raises(
        ValueError, match=r"M=48 must divide the dimension 1280; values that do: \[1, 2, 4, 5, 8,"
    ):
        validate("PQ48", 1280, len(train))
    with pytest.raises(ValueError, match="index.M"):
        validate("OPQ48,IVF4,PQ40", 1280, 10_000)
    validate("IVF4,PQ40x8", 1280, 10_000)  # 40 divides 1280, 10000 >= 256


def test_pq_needs_two_to_the_nbits_training_vectors():
    from visual_search.index import validate

    with pytest.raises(
        ValueError,
        match=r"nbits=8 needs at least 256 training vectors, got 175; lower index\.nbits",
    ):
        validate("PQ64x8", 1280, 175)
    validate("PQ64x4", 1280, 175)
