"""The index sweep's table from tracked MLflow runs, with the Pareto front marked per dataset.

    python experiments/index_table.py [--uri sqlite:///mlruns/mlflow.db] [--sweep RUN_ID]

One row per dataset x ROI x index x search setting (the latest run of each): mAP, recall@1,
neighbour recall@10 against exact search, single-thread latency p50/p95, batch throughput,
index bytes and build seconds. `*` marks the settings no other setting of the same dataset and
ROI beats on mAP, p50 latency and bytes at once.
"""

from __future__ import annotations

import argparse
import os

import mlflow
import numpy as np

from visual_search.report import markdown_table, pareto_front
from visual_search.tracking import local_uri

KEYS = ["params.dataset.name", "params.roi.policy", "params.index.name", "search"]
COLUMNS = ["pareto", "dataset", "roi", "index", "search", "map", "recall_at_1",
           "neighbour_recall_at_10", "ms_per_query_p50", "ms_per_query_p95", "batch_qps",
           "index_bytes", "index_build_s"]  # fmt: skip
FORMATS = {"map": ".3f", "recall_at_1": ".3f", "neighbour_recall_at_10": ".3f",
           "ms_per_query_p50": ".3f", "ms_per_query_p95": ".3f", "batch_qps": ".0f",
           "index_bytes": ",.0f", "index_build_s": ".2f"}  # fmt: skip


def main() -> None:
    args = _parse()
    mlflow.set_tracking_uri(local_uri(args.uri))
    names = [e.name for e in mlflow.search_experiments() if e.name.startswith("visual-search-")]
    runs = mlflow.search_runs(experiment_names=names, output_format="pandas")
    runs = runs[runs.get("metrics.ms_per_query_p50").notna()]
    if args.sweep:
        runs = runs[runs["tags.sweep_run_id"] == args.sweep]
    if runs.empty:
        raise SystemExit(f"no timed search runs at {args.uri}")
    runs = runs.assign(search=_search_setting(runs)).sort_values("start_time")
    runs = runs.groupby(KEYS, dropna=False).tail(1)
    rows = []
    for _, group in runs.groupby(["params.dataset.name", "params.roi.policy"]):
        metrics = group[["metrics.map", "metrics.ms_per_query_p50", "metrics.index_bytes"]]
        front = pareto_front(metrics.to_numpy(), maximise=[True, False, False])
        for (_, r), best in zip(group.iterrows(), front, strict=True):
            rows.append(_row(r, best))
    rows.sort(key=lambda r: (r["dataset"], r["roi"], -r["map"]))
    print(markdown_table(rows, COLUMNS, FORMATS))


def _search_setting(runs):
    cols = [c for c in runs.columns if c.startswith("params.search.") and c != "params.search.k"]
    cols = [c for c in cols if c != "params.search.max_pairs_per_chunk"]
    return (
        runs[cols].apply(
            lambda r: (
                ",".join(f"{c.split('.')[-1]}={v}" for c, v in r.items() if isinstance(v, str))
                or "-"
            ),
            axis=1,
        )
        if cols
        else "-"
    )


def _row(r, best: bool) -> dict:
    row = {
        "pareto": "*" if best else "",
        "dataset": r["params.dataset.name"],
        "roi": r["params.roi.policy"],
        "index": r["params.index.name"],
        "search": r["search"],
    }
    for name in COLUMNS[5:]:
        value = r.get(f"metrics.{name}", np.nan)
        row[name] = float(value) if value == value else np.nan
    return row


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
    )
    p.add_argument("--sweep", help="only the jobs of this sweep's MLflow run id")
    return p.parse_args()


if __name__ == "__main__":
    main()
