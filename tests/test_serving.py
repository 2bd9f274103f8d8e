"""Choosing the served run from tracked MLflow runs, and rebuilding its searcher."""

from __future__ import annotations

import re

import mlflow
import pytest

from visual_search import pipeline, serving
from visual_search.app.__main__ import load_settings
from visual_search.images import load_rgb
from visual_search.tracking import local_uri

from .conftest import DATA, MODELS, needs

pytestmark = pytest.mark.slow


@pytest.fixture
def tracked(compose_config, tmp_path):
    """Two tracked Corel-subset runs: exact search, and HNSW with a search grid of two."""
    needs(DATA / "corel1k" / "labels.csv")
    needs(MODELS / "mobilenet_v2_imagenet.pth")
    flat_cfg = compose_config("dataset.limit_per_class=4")
    flat = pipeline.run(flat_cfg, tmp_path / "flat")
    hnsw = pipeline.run(
        compose_config("dataset.limit_per_class=4", "index=hnsw",
                       "index.search_grid={efSearch:[1,64]}"),
        tmp_path / "hnsw",
    )  # fmt: skip
    return local_uri(flat_cfg.tracking.uri), flat, hnsw, flat_cfg


def test_best_run_by_metric_under_a_latency_bound_and_by_id(tracked):
    uri, flat, hnsw, _ = tracked
    best = serving.choose_run(uri, metric="map", dataset="corel1k")
    maps = [flat["map"]] + [p["map"] for p in hnsw["search_grid"]]
    assert best.metrics["map"] == pytest.approx(max(maps))
    assert "highest map on corel1k" in best.rule

    # A grid run is a nested run: config from its parent, its own search settings.
    efsearch_1 = next(p for p in hnsw["search_grid"] if p["efSearch"] == 1)
    bound = efsearch_1["ms_per_query_p95"] + 1e-9
    fast = serving.choose_run(uri, metric="map", max_latency_ms=bound)
    assert fast.metrics["ms_per_query_p95"] <= bound
    if fast.run_id != hnsw["mlflow_run_id"] and fast.search:
        assert fast.config_run_id == hnsw["mlflow_run_id"] and fast.search == {"efSearch": 1}

    named = serving.choose_run(uri, run_id=flat["mlflow_run_id"])
    assert named.run_id == named.config_run_id == flat["mlflow_run_id"] and named.search == {}


def test_a_sweep_job_holds_its_own_config_though_it_has_a_parent(tmp_path):
    uri = local_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient(tracking_uri=uri)
    sweep = client.create_run(client.create_experiment("visual-search-sweeps")).info.run_id
    job = client.create_run(client.create_experiment("visual-search-corel1k"),
                            tags={"mlflow.parentRunId": sweep}).info.run_id  # fmt: skip
    for key, value in {"dataset.name": "corel1k", "search.k": "None",
                       "search.max_pairs_per_chunk": "50000000"}.items():  # fmt: skip
        client.log_param(job, key, value)
    client.log_metric(job, "map", 0.9)
    client.set_terminated(job)
    chosen = serving.choose_run(uri, dataset="corel1k")
    assert chosen.run_id == chosen.config_run_id == job and chosen.search == {}


def test_serving_from_a_store_that_does_not_exist_creates_none(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(serving.ServeError, match="no MLflow store there"):
        serving.store_uri(f"sqlite:///{missing}")
    assert not (tmp_path / "nowhere").exists()


def test_the_serve_settings_compose_with_a_dataset_rule():
    cfg = load_settings(["dataset_name=corel1k", "max_latency_ms=50"])
    assert cfg.dataset_name == "corel1k" and cfg.max_latency_ms == 50


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("threads=0", "threads must be a whole number from 1, got 0"),
        ("port=99999", "port must be a whole number from 1 to 65535"),
        ("port=abc", "port must be a whole number"),
        ("k=0", "k must be a whole number from 1 to 100"),
        ("max_upload_mb=-1", "max_upload_mb must be positive"),
        ("max_pixels=0", "max_pixels must be a whole number from 1"),
        ("metric=a-b", "metric must be an MLflow metric name"),
        ("explain_method=x", "explain_method must be one of"),
        ("foo=bar", "configs/serve.yaml"),
    ],
)
def test_serve_settings_that_cannot_work_are_refused_before_anything_loads(override, message):
    from visual_search.app.__main__ import SettingsError

    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings([override])


def test_no_matching_run_names_the_settings(tracked, tmp_path):
    uri = tracked[0]
    with pytest.raises(serving.ServeError, match="serve.max_latency_ms"):
        serving.choose_run(uri, max_latency_ms=-1)
    with pytest.raises(serving.ServeError, match="serve.run_id=nope"):
        serving.choose_run(uri, run_id="nope")
    empty = local_uri(f"sqlite:///{tmp_path / 'empty' / 'mlflow.db'}")
    mlflow.MlflowClient(tracking_uri=empty).search_experiments()
    with pytest.raises(serving.ServeError, match="run an experiment first"):
        serving.choose_run(empty)


def test_searcher_rebuilt_from_the_chosen_run_finds_the_query_first(tracked):
    uri, flat, _, flat_cfg = tracked
    choice = serving.choose_run(uri, run_id=flat["mlflow_run_id"])
    cfg = serving.run_config(uri, choice, flat_cfg.paths)
    assert cfg.dataset.limit_per_class == 4 and cfg.index.factory == "Flat"
    searcher = serving.Searcher.build(cfg, choice.search)
    assert len(searcher.owner) == 40
    path = searcher.image_path(int(searcher.owner[5]))
    hits = searcher.query(load_rgb(path), 5)
    assert hits[0].path == searcher.dataset.items[int(searcher.owner[5])]
    assert hits[0].score > 0.999 and [h.score for h in hits] == sorted(
        (h.score for h in hits), reverse=True
    )
    assert len({h.item for h in hits}) == 5 and hits[0].label


def test_configs_saved_before_the_runtime_setting_are_upgraded():
    from omegaconf import OmegaConf

    old = OmegaConf.create({"embedder": {"backend": "timm", "arch": "mobilenetv2_100",
                                         "num_workers": None, "threads": None}})  # fmt: skip
    new = serving.upgrade(old)
    assert new.embedder.library == "timm" and new.embedder.backend == "torch"
    assert "num_workers" not in new.embedder
    current = OmegaConf.create({"embedder": {"library": "torchvision", "backend": "auto"}})
    assert serving.upgrade(current) == current
