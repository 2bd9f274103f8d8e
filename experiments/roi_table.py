"""The ROI study's table, built from tracked MLflow runs (never from a terminal).

    python experiments/roi_table.py [--uri sqlite:///mlruns/mlflow.db] [--padding 0.1]

For each dataset x policy x side (the latest run of each with the exact index, so runs of the
index sweep in the same store never stand in for the study's), prints mAP and recall@1 with the
paired difference against whole images and its 95% bootstrap interval, the fallback rate and
the detector's throughput, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os

import mlflow

from visual_search.tracking import local_uri

COLUMNS = [
    ("dataset", "params.dataset.name"),
    ("protocol", "params.dataset.protocol"),
    ("policy", "params.roi.policy"),
    ("side", "params.roi.side"),
    ("padding", "params.roi.padding"),
]


def main() -> None:
    args = _parse()
    mlflow.set_tracking_uri(local_uri(args.uri))
    experiments = [e.name for e in mlflow.search_experiments() if e.name.startswith(args.prefix)]
    runs = mlflow.search_runs(experiment_names=experiments, output_format="pandas")
    if runs.empty or "params.roi.policy" not in runs or "status" not in runs:
        raise SystemExit(f"no ROI runs in {experiments} at {args.uri}")
    runs = runs[(runs["status"] == "FINISHED") & runs["params.roi.policy"].notna()
                & (runs["params.roi.policy"] != "none")]  # fmt: skip
    runs = runs[runs["params.index.factory"] == args.factory]
    if args.padding is not None:
        runs = runs[runs["params.roi.padding"].astype(float) == args.padding]
    if runs.empty:
        raise SystemExit(f"no ROI runs in {experiments} at {args.uri}")
    runs = runs.sort_values("start_time").groupby([c for _, c in COLUMNS]).tail(1)
    runs = runs.sort_values([c for _, c in COLUMNS])
    print(table(runs))


def table(runs) -> str:
    header = [name for name, _ in COLUMNS] + [
        "mAP", "whole mAP", "ΔmAP [95% CI]", "R@1", "ΔR@1 [95% CI]", "fallback", "detector img/s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in runs.iterrows():
        # Enum-valued params were once logged as "Protocol.natural": show the value alone.
        cells = [
            str(r[c]).rsplit(".", 1)[-1] if "." in str(r[c]) and not _number(r[c]) else str(r[c])
            for _, c in COLUMNS
        ] + [
            f"{r['metrics.map']:.3f}",
            f"{r['metrics.baseline_map']:.3f}",
            _delta(r, "map"),
            f"{r['metrics.recall_at_1']:.3f}",
            _delta(r, "recall_at_1"),
            f"{r['metrics.roi_fallback_rate']:.3f}",
            _rate(r.get("metrics.detector_images_per_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _delta(r, name: str) -> str:
    m = f"metrics.{name}_delta"
    return f"{r[m]:+.3f} [{r[m + '_ci_low']:+.3f}, {r[m + '_ci_high']:+.3f}]"


def _rate(value) -> str:
    # A run whose detections all came from the cache measured no detector time.
    return "cached" if value is None or value != value else f"{value:.1f}"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
    )
    p.add_argument("--prefix", default="visual-search-", help="experiment name prefix")
    p.add_argument("--padding", type=float, default=None, help="only runs with this roi.padding")
    p.add_argument("--factory", default="Flat", help="only runs with this index.factory")
    return p.parse_args()


if __name__ == "__main__":
    main()
