"""The index sweep's table from tracked MLflow runs, with the Pareto front marked per dataset.

    python experiments/index_table.py [--uri sqlite:///mlruns/mlflow.db] [--sweep RUN_ID]

One row per dataset x ROI x index x search setting (the latest run of each, as the report reads
them): mAP, recall@1, neighbour recall@10 against exact search, single-thread latency p50/p95,
batch throughput, index bytes and build seconds. `*` marks the settings no other setting of the
same dataset and ROI setting beats on mAP, p50 latency and bytes at once.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from collections.abc import Sequence

import numpy as np

from visual_search.report import Row, load_runs, markdown_table, pareto_front
from visual_search.tracking import local_uri

COLUMNS = ["pareto", "dataset", "roi", "index", "search", "map", "recall_at_1",
           "neighbour_recall_at_10", "ms_per_query_p50", "ms_per_query_p95", "batch_qps",
           "index_bytes", "index_build_s"]  # fmt: skip
FORMATS = {"map": ".3f", "recall_at_1": ".3f", "neighbour_recall_at_10": ".3f",
           "ms_per_query_p50": ".3f", "ms_per_query_p95": ".3f", "batch_qps": ".0f",
           "index_bytes": ",.0f", "index_build_s": ".2f"}  # fmt: skip


def main() -> None:
    args = _parse()
    rows = load_runs(local_uri(args.uri), sweep=args.sweep)
    if not any(math.isfinite(r["ms_per_query_p50"]) for r in rows):
        raise SystemExit(f"no timed search runs at {args.uri}")
    print(table(rows))


def table(rows: Sequence[Row]) -> str:
    """The timed rows as Markdown, best mAP first within each dataset and ROI setting."""
    timed = [r for r in rows if math.isfinite(r["ms_per_query_p50"])]
    out = []
    for (dataset, roi), group in itertools.groupby(
        sorted(timed, key=lambda r: (r.dataset, _roi(r))), key=lambda r: (r.dataset, _roi(r))
    ):
        group = list(group)
        costs = np.array([[r["map"], r["ms_per_query_p50"], r["index_bytes"]] for r in group])
        front = pareto_front(costs, maximise=[True, False, False])
        for r, best in zip(group, front, strict=True):
            out.append({"pareto": "*" if best else "", "dataset": dataset, "roi": roi,
                        "index": r.index, "search": r.search,
                        **{name: r[name] for name in COLUMNS[5:]}})  # fmt: skip
    out.sort(key=lambda r: (r["dataset"], r["roi"], -r["map"], r["index"], r["search"]))
    return markdown_table(out, COLUMNS, FORMATS)


def _roi(row: Row) -> str:
    return row.roi if row.roi == "none" else f"{row.roi} pad {row.padding:g}"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
    )
    p.add_argument("--sweep", help="only the jobs of this sweep's MLflow run id")
    return p.parse_args()


if __name__ == "__main__":
    main()
