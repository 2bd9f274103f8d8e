"""Retrieval metrics: the shared toy case, hand-worked values, oracles and chunking."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from visual_search.metrics import (
    QueryMetrics,
    compact_scores,
    count_relevant,
    neighbour_recall,
    order_ties,
    per_class,
    query_metrics,
    rank_relevance,
    summarise,
)

from .conftest import CASES, needs

TOY = CASES / "case08_retrieval_metrics_toy"


def evaluate(scores, ids, query_labels, database_labels, exclude=None, junk=None, **kwargs):
    """The pipeline's path: relevance and scores compacted alike, then per-query metrics."""
    relevant, valid = rank_relevance(ids, query_labels, database_labels, exclude, junk)
    scores = compact_scores(scores, ids, exclude, junk)
    n_relevant = count_relevant(query_labels, database_labels, exclude, junk)
    return query_metrics(scores, relevant, valid, n_relevant, **kwargs)


def one_query(database_labels, ranking, query_label=0, **kwargs):
    """Metrics of a single query whose ranking has strictly falling scores."""
    ids = np.array([ranking])
    scores = -np.arange(len(ranking), dtype=np.float32)[None]
    return evaluate(scores, ids, np.array([query_label]), np.array(database_labels), **kwargs)


@pytest.fixture(scope="module")
def toy():
    if not TOY.is_dir():
        needs(TOY)
    expected = json.loads((TOY / "expected.json").read_text())
    scores = np.load(TOY / "gallery_scores.npy")
    labels = np.load(TOY / "gallery_labels.npy")
    return scores, labels, expected


def toy_metrics(toy, rule, tie_first=4, junk=None, interpolation="step"):
    """The toy query ranked by score, the tied items 4 and 5 in the given order, self excluded."""
    scores, labels, expected = toy
    ranking = [0, 1, 2, 3, tie_first, 9 - tie_first, 6, 7]
    query = expected["query_index_in_gallery"]
    label = expected["query_label"]
    return evaluate(
        scores[ranking][None],
        np.array([ranking]),
        np.array([label]),
        labels,
        exclude=np.array([query]),
        junk=junk,
        ks=range(1, 6),
        ties=rule,
        interpolation=interpolation,
    )


@pytest.mark.parametrize("tie_first", [4, 5], ids=["faiss-order-4-5", "faiss-order-5-4"])
@pytest.mark.parametrize("rule", ["pessimistic", "optimistic"])
def test_toy_matches_expected(toy, rule, tie_first):
    expected = toy[2]["expected"]
    step = toy_metrics(toy, rule, tie_first)
    trapezoid = toy_metrics(toy, rule, tie_first, interpolation="trapezoid")
    junk = toy_metrics(toy, rule, tie_first, junk=[toy[2]["junk_indices"]])

    assert step.n_relevant[0] == toy[2]["num_relevant_excluding_self"]
    assert step.ap[0] == pytest.approx(expected[f"AP_self_excluded_{rule}"], abs=1e-6)
    assert trapezoid.ap[0] == pytest.approx(
        expected[f"AP_oxford_trapezoid_self_excluded_{rule}"], abs=1e-6
    )
    assert junk.ap[0] == pytest.approx(expected[f"AP_junk6_ignored_{rule}"], abs=1e-6)

    means = summarise(step, ks=range(1, 6))
    for k in range(1, 6):
        assert means[f"recall_at_{k}"] == pytest.approx(expected[f"{rule}_hit@{k}"], abs=1e-6)
        assert means[f"ir_recall_at_{k}"] == pytest.approx(
            expected[f"{rule}_IRrecall@{k}"], abs=1e-6
        )
        assert means[f"precision_at_{k}"] == pytest.approx(
            expected[f"{rule}_precision@{k}"], abs=1e-6
        )
        # recall_min_k divides by what the top k can hold: min(k, n_relevant).
        min_k = step.hits[k][0] / min(k, step.n_relevant[0])
        assert min_k == pytest.approx(expected[f"{rule}_recall_min_k@{k}"], abs=1e-6)


@pytest.mark.parametrize("rule", ["pessimistic", "optimistic"])
def test_toy_tie_order(toy, rule):
    scores, labels, expected = toy
    ranking = np.array([1, 2, 3, 5, 4, 6, 7])  # FAISS may return the tie either way
    relevant = labels[ranking][None] == expected["query_label"]
    _, ordered = order_ties(scores[ranking][None], relevant, rule)

    want = labels[expected["expected"][f"ranking_self_excluded_{rule}"]] == expected["query_label"]
    np.testing.assert_array_equal(ordered[0], want)


@pytest.mark.parametrize("tie_first", [4, 5])
def test_toy_expected_over_tie_orders(toy, tie_first):
    metrics = toy_metrics(toy, "expected", tie_first)
    want = toy[2]["expected"]["AP_self_excluded_expected_over_tie_orders"]
    assert metrics.ap[0] == pytest.approx(want, abs=1e-6)
    # Ranks 4-5 hold one relevant of two whichever the order: half a hit each.
    assert metrics.hits[4][0] == pytest.approx(2.5)


def test_toy_bug_values_are_not_produced(toy):
    scores, labels, expected = toy
    bugs = expected["expected"]
    metrics = toy_metrics(toy, "pessimistic")
    assert metrics.ap[0] != pytest.approx(bugs["BUG_AP_self_included_as_positive_pessimistic"])
    assert metrics.ap[0] != pytest.approx(
        bugs["BUG_AP_self_removed_but_counted_in_denominator_pessimistic"]
    )
    assert summarise(metrics, ks=[1])["recall_at_1"] != bugs["BUG_hit@1_self_included"]

    # Ranking the query itself while counting relevant items without it is refused, not scored.
    ids = np.arange(8)[None]
    relevant, valid = rank_relevance(ids, [0], labels)
    with pytest.raises(ValueError, match="exclude"):
        query_metrics(scores[None], relevant, valid, count_relevant([0], labels, exclude=[0]))


def test_perfect_ranking():
    # Relevant at ranks 1, 2, 3 of 3: AP = (1/1 + 2/2 + 3/3) / 3 = 1; precision@5 = 3/5.
    metrics = one_query([0, 0, 0, 1, 1], [0, 1, 2, 3, 4], ks=[1, 5])
    assert metrics.ap[0] == pytest.approx(1.0)
    assert summarise(metrics, ks=[1, 5])["precision_at_5"] == pytest.approx(0.6)


def test_all_wrong():
    # The top 2 holds none of the 3 relevant items: AP 0, no hit, precision 0.
    metrics = one_query([0, 0, 0, 1, 1], [3, 4], ks=[1, 2])
    means = summarise(metrics, ks=[1, 2])
    assert metrics.ap[0] == 0.0
    assert means["recall_at_2"] == 0.0 and means["precision_at_2"] == 0.0


def test_single_relevant_at_rank_three():
    # One relevant item, at rank 3: AP = (1/3) / 1.
    metrics = one_query([1, 1, 0, 1], [0, 1, 2, 3], ks=[1, 3])
    assert metrics.ap[0] == pytest.approx(1 / 3)
    assert metrics.hits[1][0] == 0 and metrics.hits[3][0] == 1


def test_truncated_ranking_keeps_full_denominator():
    # 4 relevant (ids 0, 2, 3, 5); the top 3 finds ids 0 and 2 at ranks 1 and 3.
    # AP = (1/1 + 2/3) / 4 = 0.416667: the two never retrieved add precision 0.
    metrics = one_query([0, 1, 0, 0, 1, 0], [0, 1, 2], ks=[3, 10])
    assert metrics.ap[0] == pytest.approx((1 + 2 / 3) / 4)
    # precision@10 still divides by 10; IR recall@3 = 2 of 4.
    means = summarise(metrics, ks=[3, 10])
    assert means["precision_at_10"] == pytest.approx(0.2)
    assert means["ir_recall_at_3"] == pytest.approx(0.5)


def test_query_without_relevant_is_counted_not_averaged():
    # Query 0 (label 0) has AP 1/2 (its one relevant item at rank 2); query 1 (label 7) has none.
    database_labels = np.array([1, 0, 1])
    ids = np.array([[0, 1, 2], [1, 0, 2]])
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    metrics = evaluate(scores, ids, np.array([0, 7]), database_labels, ks=[1])
    assert np.isnan(metrics.ap[1])
    means = summarise(metrics, ks=[1])
    assert means["map"] == pytest.approx(0.5)
    assert means["n_queries"] == 2 and means["n_queries_without_relevant"] == 1


def test_padding_slots_are_invalid():
    # FAISS found one result (relevant) of k=3: AP = 1/1 over 1 relevant; precision@3 = 1/3.
    ids = np.array([[1, -1, -1]])
    scores = np.array([[0.9, -np.inf, -np.inf]])
    relevant, valid = rank_relevance(ids, [0], [1, 0])
    np.testing.assert_array_equal(valid, [[True, False, False]])
    metrics = evaluate(scores, ids, [0], [1, 0], ks=[3])
    assert metrics.ap[0] == pytest.approx(1.0)
    assert summarise(metrics, ks=[3])["precision_at_3"] == pytest.approx(1 / 3)


def test_exclude_self():
    # The query is database id 0 (label 0). Without it the ranking is ids 1, 2, 3 with relevant
    # at ranks 1 and 3 of 2 relevant: AP = (1/1 + 2/3) / 2 = 0.833333.
    database_labels = np.array([0, 0, 1, 0])
    relevant, valid = rank_relevance([[0, 1, 2, 3]], [0], database_labels, exclude=[0])
    np.testing.assert_array_equal(relevant, [[True, False, True, False]])
    np.testing.assert_array_equal(valid, [[True, True, True, False]])
    assert count_relevant([0], database_labels, exclude=[0])[0] == 2
    metrics = one_query(database_labels, [0, 1, 2, 3], exclude=[0])
    assert metrics.ap[0] == pytest.approx((1 + 2 / 3) / 2)


def test_junk_of_the_same_label_is_neither_ranked_nor_counted():
    # Junk id 1 has the query's label: 2 relevant remain (ids 0, 2), ranked 1st and 2nd.
    database_labels = np.array([0, 0, 0, 1])
    assert count_relevant([0], database_labels, junk=[[1]])[0] == 2
    metrics = one_query(database_labels, [0, 1, 2, 3], junk=[[1]])
    assert metrics.ap[0] == pytest.approx(1.0)


def test_expected_hit_chance_inside_a_tie():
    # Three items tie at the top, one relevant: each top slot is relevant with chance 1/3,
    # so hits@1 = 1/3 and the chance of a hit in the top 2 is 1 - C(2,2)/C(3,2) = 2/3.
    scores = np.array([[1.0, 1.0, 1.0, 0.5]])
    relevant = np.array([[False, True, False, False]])
    valid = np.ones_like(relevant)
    metrics = query_metrics(scores, relevant, valid, [1], ks=[1, 2, 3], ties="expected")
    assert metrics.hits[1][0] == pytest.approx(1 / 3)
    assert metrics.any_hit[1][0] == pytest.approx(1 / 3)
    assert metrics.any_hit[2][0] == pytest.approx(2 / 3)
    assert metrics.any_hit[3][0] == 1.0
    # AP: the relevant item lands on rank 1, 2 or 3 alike: (1 + 1/2 + 1/3) / 3.
    assert metrics.ap[0] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_ap_matches_sklearn_on_full_rankings():
    rng = np.random.default_rng(0)
    n_queries, n_db = 40, 120
    database_labels = rng.integers(0, 5, n_db)
    query_labels = rng.integers(0, 5, n_queries)
    scores = rng.random((n_queries, n_db))
    ids = np.argsort(-scores, axis=1)
    ranked = np.take_along_axis(scores, ids, 1)
    for ties in ("pessimistic", "expected"):
        metrics = evaluate(ranked, ids, query_labels, database_labels, ks=[10], ties=ties)
        for q in range(n_queries):
            want = average_precision_score(database_labels == query_labels[q], scores[q])
            assert metrics.ap[q] == pytest.approx(want, abs=1e-12)


def brute_force_expectation(scores, relevant, k):
    """AP, hits@k and hit chance@k averaged over every order that keeps scores non-increasing."""
    results = []
    for order in itertools.permutations(range(len(scores))):
        if np.all(np.diff(scores[list(order)]) <= 0):
            rel = relevant[list(order)]
            found = np.cumsum(rel)
            ap = np.sum(rel * found / np.arange(1, len(rel) + 1)) / relevant.sum()
            results.append((ap, found[k - 1], found[k - 1] > 0))
    return np.mean(results, axis=0)


def test_tie_aware_ap_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(30):
        scores = np.sort(rng.integers(0, 3, 6).astype(float))[::-1].copy()
        relevant = rng.random(6) < 0.5
        relevant[rng.integers(6)] = True
        metrics = query_metrics(
            scores[None],
            relevant[None],
            np.ones((1, 6), bool),
            [relevant.sum()],
            ks=[1, 2, 3, 4],
            ties="expected",
        )
        for k in (1, 2, 3, 4):
            ap, hits, chance = brute_force_expectation(scores, relevant, k)
            assert metrics.ap[0] == pytest.approx(ap)
            assert metrics.hits[k][0] == pytest.approx(hits)
            assert metrics.any_hit[k][0] == pytest.approx(chance)


def test_neighbour_recall_tie_at_the_boundary():
    # Exact top 3 is ids 0, 1, 2 (scores .9 .8 .7); id 3 also scores .7 and the ANN returned it.
    exact_ids = np.array([[0, 1, 2]])
    exact_scores = np.array([[0.9, 0.8, 0.7]])
    ids = np.array([[0, 1, 3]])
    scores = np.array([[0.9, 0.8, 0.7]])
    assert neighbour_recall(ids, exact_ids, k=3) == pytest.approx(2 / 3)
    assert neighbour_recall(ids, exact_ids, exact_scores, scores, k=3) == pytest.approx(1.0)
    # A lower score at the boundary still misses, and padding never counts.
    assert neighbour_recall(ids, exact_ids, exact_scores, scores - [0, 0, 0.1], k=3) == (
        pytest.approx(2 / 3)
    )
    assert neighbour_recall([[0, -1, -1]], exact_ids, k=3) == pytest.approx(1 / 3)


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "expected"])
def test_chunks_concatenate_to_the_whole(ties):
    rng = np.random.default_rng(2)
    n_queries, n_db, k = 30, 60, 15
    database_labels = rng.integers(0, 4, n_db)
    query_labels = database_labels[:n_queries]
    # Coarse scores make ties common; queries are database items 0..29, so exclude them.
    scores = np.round(rng.random((n_queries, n_db)), 1)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ranked = np.take_along_axis(scores, ids, 1)
    exclude = np.arange(n_queries)
    ks = [1, 5, 10, 20]

    def run(rows):
        return evaluate(
            ranked[rows],
            ids[rows],
            query_labels[rows],
            database_labels,
            exclude=exclude[rows],
            ks=ks,
            ties=ties,
        )

    whole = run(slice(None))
    parts = QueryMetrics.concat([run(slice(0, 7)), run(slice(7, 20)), run(slice(20, None))])
    np.testing.assert_allclose(parts.ap, whole.ap, rtol=0, atol=1e-12)
    for k in ks:
        np.testing.assert_allclose(parts.hits[k], whole.hits[k], rtol=0, atol=1e-12)
    assert summarise(parts, ks) == pytest.approx(summarise(whole, ks), nan_ok=True)


def test_summary_keys_and_per_class():
    metrics = QueryMetrics(
        ap=np.array([1.0, 0.5, np.nan]),
        hits={1: np.array([1.0, 0.0, 0.0]), 10: np.array([2.0, 1.0, 0.0])},
        any_hit={1: np.array([1.0, 0.0, 0.0]), 10: np.array([1.0, 1.0, 0.0])},
        n_relevant=np.array([2, 4, 0]),
    )
    means = summarise(metrics, ks=[1, 10])
    assert list(means) == [
        "map",
        "precision_at_1",
        "precision_at_10",
        "recall_at_1",
        "recall_at_10",
        "ir_recall_at_1",
        "ir_recall_at_10",
        "n_queries",
        "n_queries_without_relevant",
    ]
    assert means["map"] == pytest.approx(0.75)
    assert means["ir_recall_at_10"] == pytest.approx((2 / 2 + 1 / 4) / 2)

    rows = per_class(metrics, np.array([0, 1, 1]), ["cats", "dogs"])
    assert rows[0] == {
        "class": "cats",
        "n_queries": 1,
        "map": 1.0,
        "precision_at_10": 0.2,
        "recall_at_1": 1.0,
    }
    assert rows[1]["n_queries"] == 2 and rows[1]["map"] == pytest.approx(0.5)


def test_bad_shapes_name_the_value():
    with pytest.raises(ValueError, match=r"valid must be of shape \(2, 3\), got shape \(2, 2\)"):
        query_metrics(np.zeros((2, 3)), np.zeros((2, 3), bool), np.zeros((2, 2), bool), [1, 1])
    with pytest.raises(ValueError, match="query_labels must be 1-D of length 1"):
        rank_relevance([[0, 1]], [0, 0], [0, 1])
    with pytest.raises(ValueError, match="ties must be one of"):
        query_metrics(np.zeros((1, 1)), [[True]], [[True]], [1], ties="random")
