"""Run one experiment (or a sweep with -m): `python experiments/run.py dataset=grocery_natural`.

Outputs go to hydra.run.dir (resolved config.yaml, metrics.json, per-query and per-class
tables, retrieval_grid.png); the run is tracked in MLflow.
"""

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from visual_search.config import register_configs
from visual_search.pipeline import run

register_configs()
log = logging.getLogger("visual_search.run")


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    results = run(cfg, out_dir)
    print(format_results(cfg, results, out_dir))
    return results["map"]


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
    lines = [
        f"\n{cfg.dataset.name} | {roi} | {cfg.embedder.backend}/{cfg.embedder.arch} | "
        f"{cfg.index.factory}"
    ]
    lines += [f"  {name:<22} {_fmt(results[name])}" for name in shown if name in results]
    for name in ("map", "recall_at_1"):
        if f"{name}_delta" in results:
            low, high = results[f"{name}_delta_ci_low"], results[f"{name}_delta_ci_high"]
            lines.append(
                f"  ROI - whole image {name}: {results[f'{name}_delta']:+.4f} "
                f"(95% CI {low:+.4f} .. {high:+.4f})"
            )
    lines.append(f"  outputs: {out_dir}")
    if "mlflow_run_id" in results:
        lines.append(
            f"  mlflow:  run {results['mlflow_run_id']} in {cfg.tracking.experiment} "
            f"({cfg.tracking.uri})"
        )
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
