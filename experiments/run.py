"""Run one experiment (or a sweep with -m): `python experiments/run.py dataset=grocery_natural`.

Outputs go to hydra.run.dir (resolved config.yaml, metrics.json, per-query and per-class
tables, retrieval_grid.png); the run is tracked in MLflow.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from visual_search import tracking
from visual_search.config import register_configs
from visual_search.data import DatasetError
from visual_search.embed import WeightsError
from visual_search.pipeline import ConfigError, NothingToSearch, run
from visual_search.roi import DetectorError
from visual_search.tracking import TrackingError

register_configs()
log = logging.getLogger("visual_search.run")


# Mistakes in settings or inputs: the message says what to change, a traceback would not help.
USER_ERRORS = (ConfigError, NothingToSearch, DatasetError, WeightsError, DetectorError,
               TrackingError)  # fmt: skip


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, out_dir)
    except USER_ERRORS as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # One job that does not fit its data must not end the sweep; its parent run says so.
            tracking.note_failed_job(cfg.tracking, hydra_cfg.job.num,
                                     " ".join(hydra_cfg.overrides.task), str(err))  # fmt: skip
            return float("nan")
        sys.exit(2)
    print(format_results(cfg, results, out_dir))
    # What a Hydra optimising sweeper would maximise: mAP (the best setting's, for a grid).
    return results.get("map", max((p["map"] for p in results.get("search_grid", [])), default=0.0))


def format_results(cfg: DictConfig, results: dict, out_dir: Path) -> str:
    """The table printed at the end of a run."""
    shown = ["map"] + [
        k for k in results if k.startswith(("precision_at", "recall_at")) and "delta" not in k
    ]
    shown += ["n_queries", "n_database", "n_skipped", "embed_s", "search_s"]
    shown += ["roi_fallback_rate", "detect_s", "detector_images_per_s"]
    roi = (
        f"roi {cfg.roi.policy.name} ({cfg.roi.side.name})"
        if cfg.roi.policy.name != "none"
        else "no roi"
    )
    model = f"{cfg.embedder.library}/{cfg.embedder.arch} ({results.get('embed_backend', '?')})"
    lines = [f"\n{cfg.dataset.name} | {roi} | {model} | {cfg.index.factory}"]
    lines += [f"  {name:<22} {_fmt(results[name])}" for name in shown if name in results]
    for name in ("map", "recall_at_1"):
        if f"{name}_delta" in results:
            low, high = results[f"{name}_delta_ci_low"], results[f"{name}_delta_ci_high"]
            lines.append(
                f"  ROI - whole image {name}: {results[f'{name}_delta']:+.4f} "
                f"(95% CI {low:+.4f} .. {high:+.4f})"
            )
    if "search_grid" in results:
        lines.append(_grid_table(results["search_grid"]))
    lines.append(f"  outputs: {out_dir}")
    if "mlflow_run_id" in results:
        lines.append(
            f"  mlflow:  run {results['mlflow_run_id']} in {cfg.tracking.experiment} "
            f"({cfg.tracking.uri})"
        )
    return "\n".join(lines)


def _grid_table(points: list[dict]) -> str:
    """One line per search setting: quality against latency."""
    names = [k for k in points[0] if k not in _GRID_METRICS and not k.startswith(_SKIP)]
    columns = [*names, *_GRID_METRICS]
    cells = [[str(p[n]) for n in names] + [_fmt(p.get(m, float("nan"))) for m in _GRID_METRICS]
             for p in points]  # fmt: skip
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    return "\n".join(
        "  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(row, widths, strict=True))
        for row in [columns, *cells]
    )


_GRID_METRICS = ("map", "recall_at_1", "neighbour_recall_at_10", "ms_per_query_p50", "batch_qps")
_SKIP = ("precision", "recall", "ir_recall", "n_", "ms_", "batch", "latency", "search_s", "map")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
