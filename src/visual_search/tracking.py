"""MLflow tracking: one experiment per dataset, the flattened resolved config as params.

The default store is local (SQLite plus an artifacts folder); `tracking.uri` (or the
MLFLOW_TRACKING_URI variable) points at a tracking server instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"}; lists stay whole, as their string form."""
    flat: dict[str, str] = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = str(value)[:MAX_PARAM_CHARS]
    return flat


def local_uri(uri: str) -> str:
    """Make a relative `sqlite:///path` absolute (MLflow resolves it against the cwd anyway,
    but the logged location should say where the store really is) and create its folder."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return uri
    path = Path(uri[len(prefix) :]).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return prefix + str(path)


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _words(results: Mapping[str, Any]) -> dict[str, str]:
    """Results that are words, not numbers (e.g. which runtime embedded): logged as tags."""
    return {k: v for k, v in results.items() if isinstance(v, str)}


def experiment_id_for(name: str, tracking_cfg) -> str:
    """The experiment's id, creating it if needed; safe when parallel jobs race to create it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = mlflow.get_tracking_uri()
    if tracking_cfg.artifact_root and uri.startswith("sqlite:"):
        location = Path(tracking_cfg.artifact_root).resolve().as_uri()
    elif uri.startswith("sqlite:///"):  # a local store keeps its files beside its database
        location = (Path(local_uri(uri).removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(name, location)
    except MlflowException:
        experiment = mlflow.get_experiment_by_name(name)  # another job created it meanwhile
        if experiment is None:
            raise
        return experiment.experiment_id


def default_run_name(params: Mapping[str, Any]) -> str:
    """e.g. ``corel1k-largest-query-mobilenet_v2-Flat``: what tells runs of one dataset apart
    (``corel1k-10-per-class-...`` for a subset)."""
    roi = params.get("roi", {})
    crop = "whole" if roi.get("policy", "none") == "none" else f"{roi['policy']}-{roi['side']}"
    dataset = params["dataset"]["name"]
    if params["dataset"].get("limit_per_class") is not None:
        dataset += f"-{params['dataset']['limit_per_class']}-per-class"
    return "-".join([dataset, crop, params["embedder"]["arch"], params["index"]["factory"]])


class TrackingError(ValueError):
    """The tracking store cannot be used; raised before any compute."""


def check_server(uri: str, setting: str = "tracking.uri") -> None:
    """A tracking server must answer its health check within a few seconds (MLflow itself
    retries a refused connection for minutes)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            pass
    except OSError as err:
        raise TrackingError(
            f"{setting}={uri} (MLFLOW_TRACKING_URI) does not answer: {err}; start the server, "
            "or use a local store with tracking.uri=sqlite:///mlruns/mlflow.db"
        ) from err


def existing_store(uri: str, setting: str) -> str:
    """`uri` ready to read runs from: a local SQLite store must already exist (reading never
    creates one) and a server must answer; raises TrackingError naming `setting` otherwise."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).expanduser().is_file():
        raise TrackingError(
            f"no MLflow store at {uri} ({setting}); with no MLflow store there yet, run an "
            "experiment first (make bench), or point MLFLOW_TRACKING_URI at the store"
        )
    if uri.startswith(("http://", "https://")):
        check_server(uri, setting)
    return local_uri(uri)


def check(tracking_cfg) -> None:
    """Make sure runs can be recorded before an hour of compute depends on it.

    A local SQLite store must be creatable, a tracking server must answer its health check
    within a few seconds; any other URI scheme is left to MLflow.
    """
    if not tracking_cfg.enabled:
        return
    uri = tracking_cfg.uri
    if not tracking_cfg.experiment:
        raise TrackingError("tracking.experiment is empty; name the MLflow experiment")
    if uri.startswith("sqlite:///"):
        path = Path(local_uri(uri)[len("sqlite:///") :])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"tracking.uri={uri}: cannot create {path.parent}: {err}") from err
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise TrackingError(f"tracking.uri={uri}: {path} is not writable; point it elsewhere")
        _create_store_once(local_uri(uri), path)
    elif uri.startswith(("http://", "https://")):
        check_server(uri)
    elif "://" in uri and not uri.startswith(("file://", "databricks", "postgresql", "mysql")):
        raise TrackingError(
            f"tracking.uri={uri}: unknown scheme; use sqlite:///path.db or http(s)://server"
        )


def _create_store_once(uri: str, path: Path) -> None:
    """Create or migrate a SQLite store under a file lock.

    MLflow creates its tables on first use; two jobs of a parallel sweep doing that at once on a
    new file fail with duplicate-column or migration errors (seen with the joblib launcher).
    """
    import fcntl

    import mlflow

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def log_run(
    tracking_cfg,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    artifacts: Iterable[Path],
    children: Iterable[tuple[Mapping[str, Any], Mapping[str, float]]] = (),
) -> str:
    """Record one run and return its id.

    Args:
        tracking_cfg: the `tracking` config group.
        params: the resolved config as a nested mapping (flattened here).
        metrics: results; only finite numbers are logged (MLflow rejects NaN, and lists or
            strings are not metrics).
        artifacts: files copied into the run.
        children: (search params, metrics) per search setting, each logged as a nested run
            that carries the parent's params plus ``search.<name>``.
    """
    import mlflow

    uri = local_uri(tracking_cfg.uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = experiment_id_for(tracking_cfg.experiment, tracking_cfg)

    name = tracking_cfg.run_name or default_run_name(params)
    parent = os.environ.get(SWEEP_RUN_VARIABLE)
    tags = {"mlflow.parentRunId": parent, "sweep_run_id": parent} if parent else None
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        mlflow.log_params(flatten(params))
        mlflow.log_metrics(_finite(metrics))
        mlflow.set_tags(_words(metrics))
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for search_params, child_metrics in children:
            label = ",".join(f"{k}={v}" for k, v in search_params.items())
            child_tags = {"sweep_run_id": parent} if parent else None
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=f"{name} {label}", nested=True,
                tags=child_tags,
            ):  # fmt: skip
                mlflow.log_params(flatten(params))
                mlflow.log_params({f"search.{k}": v for k, v in search_params.items()})
                mlflow.log_metrics(_finite(child_metrics))
                mlflow.set_tags(_words(child_metrics))
    log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, tracking_cfg.experiment, uri)
    return run.info.run_id


SWEEP_RUN_VARIABLE = "VISUAL_SEARCH_SWEEP_RUN_ID"


class SweepCallback(Callback):
    """Hydra callback: one MLflow parent run per multirun, which every job's run points to.

    Jobs log into their dataset's experiment; each carries the tags ``mlflow.parentRunId`` and
    ``sweep_run_id``. The id travels in an environment variable, which launcher processes
    started after the sweep begins inherit.
    """

    def on_multirun_start(self, config, **kwargs) -> None:
        import mlflow

        if not config.tracking.enabled:
            return
        check(config.tracking)  # also creates a new SQLite store before jobs race to
        mlflow.set_tracking_uri(local_uri(config.tracking.uri))
        experiment = "visual-search-sweeps"
        experiment_id = experiment_id_for(experiment, config.tracking)
        name = Path(config.hydra.sweep.dir).name
        run = mlflow.MlflowClient().create_run(
            experiment_id,
            run_name=f"sweep {name}",
            tags={
                "sweep_dir": str(config.hydra.sweep.dir),
                "overrides": " ".join(config.hydra.overrides.task),
            },  # fmt: skip
        )
        os.environ[SWEEP_RUN_VARIABLE] = run.info.run_id
        log.info("MLflow sweep run %s in experiment %s", run.info.run_id, experiment)

    def on_multirun_end(self, config, **kwargs) -> None:
        import mlflow

        run_id = os.environ.pop(SWEEP_RUN_VARIABLE, None)
        if not run_id:
            return
        client = mlflow.MlflowClient()
        failed = sorted(v for k, v in client.get_run(run_id).data.tags.items()
                        if k.startswith(FAILED_JOB_TAG))  # fmt: skip
        client.set_tag(run_id, "failed_jobs", str(len(failed)))
        if failed:
            log.warning("%d job(s) of this sweep failed (tags %sN of MLflow run %s):\n  %s",
                        len(failed), FAILED_JOB_TAG, run_id, "\n  ".join(failed))  # fmt: skip
        client.set_terminated(run_id)


FAILED_JOB_TAG = "failed_job."


def note_failed_job(tracking_cfg, job: int, overrides: str, error: str) -> None:
    """Record on the sweep's parent run that job `job` stopped with `error`, so a sweep that
    goes on past a job that did not fit its data still says which ones are missing."""
    parent = os.environ.get(SWEEP_RUN_VARIABLE)
    if not parent or not tracking_cfg.enabled:
        return
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=local_uri(tracking_cfg.uri)).set_tag(
            parent, f"{FAILED_JOB_TAG}{job}", f"{overrides}: {error}"[:5000]
        )
    except Exception as err:  # noqa: BLE001 -- the store itself may be what failed
        log.warning("could not record the failed job on sweep run %s: %s", parent, err)
