"""Search grids, the Pareto helper, experiment configs and sweeps tracked under a parent run."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from visual_search import pipeline
from visual_search.report import markdown_table, pareto_front

from .conftest import DATA, MODELS, REPO, needs


def _multirun(tmp_path, tracking_uri: str, *overrides: str) -> subprocess.CompletedProcess:
    """`experiments/run.py -m` on the real data, with caches, store and outputs in tmp_path."""
    env = {
        **os.environ,
        "VISUAL_SEARCH_DATA": str(DATA),
        "VISUAL_SEARCH_MODELS": str(MODELS),
        "VISUAL_SEARCH_CACHE": str(tmp_path / "cache"),
        "MLFLOW_TRACKING_URI": tracking_uri,
    }
    command = [
        sys.executable, str(REPO / "experiments" / "run.py"), "-m", *overrides,
        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"tracking.artifact_root={tmp_path / 'art'}",
    ]  # fmt: skip
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_pareto_front_on_fixed_points():
    # columns: quality (higher better), latency, bytes (lower better)
    points = np.array(
        [
            [0.90, 1.0, 100],  # exact: best quality
            [0.85, 0.1, 100],  # faster, same memory: on the front
            [0.80, 0.2, 100],  # beaten by the row above on all three
            [0.70, 0.1, 10],  # smallest: on the front
            [0.70, 0.1, 10],  # an equal copy stays on the front
            [np.nan, 0.01, 1],  # unmeasured quality: never on the front
        ]
    )
    front = pareto_front(points, maximise=[True, False, False])
    assert front.tolist() == [True, True, False, True, True, False]
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        pareto_front(points[:, :2], maximise=[True, False, False])


def test_markdown_table_formats_numbers_and_leaves_the_rest():
    table = markdown_table([{"a": 0.12345, "b": "x", "c": float("nan")}], ["a", "b", "c"],
                           {"a": ".2f", "c": ".1f"})  # fmt: skip
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 0.12 | x | - |"]


@pytest.mark.parametrize("experiment", ["roi_study", "index_sweep"])
def test_every_experiment_config_composes(experiment, monkeypatch):
    monkeypatch.setenv("VISUAL_SEARCH_DATA", str(DATA))
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert "dataset" in cfg.hydra.sweeper.params
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "visual_search.tracking.SweepCallback"


@pytest.mark.parametrize("name", ["flat", "ivf_flat", "ivf_pq", "hnsw", "sq8", "pq", "opq_ivf_pq"])
def test_every_index_config_composes_and_validates(name, compose_config):
    from visual_search import index

    cfg = compose_config(f"index={name}")
    index.validate(cfg.index.factory, 1280, 5000)  # the real embedding size, a mid database
    grid = pipeline.search_settings(cfg)
    assert grid and all(set(p) <= {"nprobe", "efSearch"} for p in grid)


def test_search_settings_are_the_cartesian_product(compose_config):
    cfg = compose_config("index=factory", "index.factory='IVF4_HNSW8,Flat'",
                         "+index.search_grid={nprobe:[1,2],efSearch:[16,32,64]}")  # fmt: skip
    grid = pipeline.search_settings(cfg)
    assert len(grid) == 6 and {"nprobe": 2, "efSearch": 64} in grid
    assert pipeline.search_settings(compose_config()) == [{}]


@pytest.mark.slow
def test_a_search_grid_is_one_build_and_a_nested_run_per_setting(compose_config, tmp_path):
    needs(DATA / "corel1k")
    cfg = compose_config("dataset.limit_per_class=4", "index=ivf_flat", "index.nlist=2",
                         "index.search_grid={nprobe:[1,2]}")  # fmt: skip
    results = pipeline.run(cfg, tmp_path)
    grid = results["search_grid"]
    assert [p["nprobe"] for p in grid] == [1, 2]
    # All lists probed = exact search: every exact neighbour found.
    assert grid[1]["neighbour_recall_at_10"] == 1.0
    assert grid[0]["neighbour_recall_at_10"] <= 1.0
    for p in grid:
        assert p["ms_per_query_p50"] > 0 and p["batch_qps"] > 0 and p["latency_threads"] == 1
    assert results["index_bytes"] > 40 * 1280 * 4  # 40 vectors of 1280 float32, plus lists
    children = mlflow.search_runs(
        experiment_names=["visual-search-corel1k"],
        filter_string=f"tags.mlflow.parentRunId = '{results['mlflow_run_id']}'",
    )
    assert sorted(children["params.search.nprobe"]) == ["1", "2"]
    assert (children["metrics.index_bytes"] == results["index_bytes"]).all()
    again = pipeline.run(cfg, tmp_path / "again")
    assert again["index_cached"] == 1


@pytest.mark.slow
def test_a_multirun_has_one_parent_run_and_every_job_points_to_it(tmp_path):
    needs(DATA / "corel1k")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # 10 vectors cannot train 8-bit PQ: that job fails, the sweep goes on and says so.
    proc = _multirun(tmp_path, uri, "dataset.limit_per_class=1", "index=flat,sq8,pq")
    mlflow.set_tracking_uri(uri)
    (parent,) = mlflow.search_runs(experiment_names=["visual-search-sweeps"]).run_id
    jobs = mlflow.search_runs(experiment_names=["visual-search-corel1k"])
    assert len(jobs) == 2
    assert (jobs["tags.mlflow.parentRunId"] == parent).all()
    assert sorted(jobs["params.index.name"]) == ["flat", "sq8"]
    tags = mlflow.get_run(parent).data.tags
    assert tags["failed_jobs"] == "1" and "index=pq" in tags["failed_job.2"]
    assert "256 training vectors" in tags["failed_job.2"]
    assert "1 job(s) of this sweep failed" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_parallel_jobs_share_a_new_sqlite_store_without_errors(tmp_path):
    """Two joblib workers writing to one new SQLite store: every job must be recorded."""
    needs(DATA / "corel1k")
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    proc = _multirun(tmp_path, uri, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "dataset.limit_per_class=1", "index=flat,sq8,hnsw,ivf_flat",
                     "index.nlist=2")  # fmt: skip
    assert "Traceback" not in proc.stderr
    mlflow.set_tracking_uri(uri)
    jobs = mlflow.search_runs(
        experiment_names=["visual-search-corel1k"], filter_string="tags.sweep_run_id != ''"
    )
    top = jobs[~jobs["tags.mlflow.runName"].str.contains("=")]  # job runs, not grid settings
    assert sorted(top["params.index.name"]) == ["flat", "hnsw", "ivf_flat", "sq8"]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server with a SQLite database backend, on a free local port."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "mlflow") if (REPO / ".venv").exists() else "mlflow",
         "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", (tmp_path / "server-art").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the MLflow server did not start within 120 s")
                time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_runs_are_recorded_on_a_tracking_server(compose_config, tmp_path, mlflow_server):
    needs(DATA / "corel1k")
    cfg = compose_config("dataset.limit_per_class=2", "index=ivf_flat", "index.nlist=2",
                         "index.search_grid={nprobe:[1,2]}",
                         f"tracking.uri={mlflow_server}")  # fmt: skip
    results = pipeline.run(cfg, tmp_path / "out")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(results["mlflow_run_id"])
    assert run.data.params["index.factory"] == "IVF2,Flat"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "metrics.json",
        "config.yaml",
    }
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(c.data.params["search.nprobe"] for c in children) == ["1", "2"]


def test_the_slurm_launcher_config_composes(monkeypatch):
    monkeypatch.setenv("VISUAL_SEARCH_DATA", str(DATA))
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=cpu"],
                      return_hydra_config=True)  # fmt: skip
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "cpu" and cfg.hydra.launcher.cpus_per_task == 8


@pytest.mark.slow
def test_a_sweep_runs_through_submitit_local_processes(tmp_path):
    needs(DATA / "corel1k")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _multirun(tmp_path, uri, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
              "dataset.limit_per_class=1", "index=flat,sq8")  # fmt: skip
    mlflow.set_tracking_uri(uri)
    jobs = mlflow.search_runs(experiment_names=["visual-search-corel1k"])
    assert sorted(jobs["params.index.name"]) == ["flat", "sq8"]
    assert jobs["tags.mlflow.parentRunId"].nunique() == 1
