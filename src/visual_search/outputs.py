"""The run directory: every file a run leaves for a reader, also logged to MLflow.

- `config.yaml`: the resolved config;
- `metrics.json`: the run's metrics (keys as in the README);
- `per_query.csv`: per query its id, label, relevant count, AP, hits at each k and top ids;
- `per_class.csv`: mAP, P@10 and R@1 per query class;
- `skipped.csv`: files that could not be decoded, with the reason;
- `crops.jsonl` (ROI runs): per cropped image its detections and the chosen boxes, or the
  fallback to the whole image;
- `retrieval_grid.png`: a few queries and their top results.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from visual_search import cache, data, metrics, visualise


def write(cfg, embedded, crops, evaluation, results: dict, out_dir: Path) -> list[Path]:
    """Write the run directory and return the files to track.

    NOTE: with an index search grid, `evaluation` is the first setting's: per-query results and
    the grid figure are written for it alone, while every setting's metrics are in
    `metrics.json` and MLflow. Writing each setting's per-query file is left to do.
    """
    ds = embedded.dataset
    paths = {
        "config": out_dir / "config.yaml",
        "metrics": out_dir / "metrics.json",
        "per_query": out_dir / "per_query.csv",
        "per_class": out_dir / "per_class.csv",
        "skipped": out_dir / "skipped.csv",
        "grid": out_dir / "retrieval_grid.png",
    }
    cache.write_atomic(paths["config"], OmegaConf.to_yaml(cfg, resolve=True).encode())
    # JSON has no NaN: a metric with no value (e.g. mAP when no query has a relevant item)
    # is written as null.
    cache.write_json(paths["metrics"], {k: _json_number(_rounded(v)) for k, v in results.items()})
    _write_per_query(paths["per_query"], cfg, ds, evaluation)
    query_labels = ds.labels[ds.query]
    _write_rows(
        paths["per_class"], metrics.per_class(evaluation.per_query, query_labels, ds.class_names)
    )
    write_skipped(out_dir, embedded.skipped)
    _write_grid(paths["grid"], cfg, ds, evaluation)
    if crops.detections:
        paths["crops"] = out_dir / "crops.jsonl"
        _write_crops(paths["crops"], ds, crops)
    log_file = out_dir / "run.log"  # Hydra's log of this run, when run from the command line
    return list(paths.values()) + ([log_file] if log_file.is_file() else [])


def write_skipped(out_dir: Path, skipped: dict[str, str]) -> Path:
    """`skipped.csv`: each file left out of the run, and why."""
    path = out_dir / "skipped.csv"
    _write_rows(path, [{"id": k, "reason": v} for k, v in skipped.items()], ["id", "reason"])
    return path


def _write_per_query(path: Path, cfg, ds: data.Dataset, evaluation) -> None:
    pq = evaluation.per_query
    rows = []
    for i, q in enumerate(ds.query):
        row = {
            "id": ds.items[q],
            "label": ds.class_names[ds.labels[q]],
            "n_relevant": int(pq.n_relevant[i]),
        }
        row["ap"] = round(float(pq.ap[i]), 6)
        row.update({f"hits_at_{k}": _count(pq.hits[k][i]) for k in cfg.eval.ks})
        row["top_ids"] = " ".join(ds.items[ds.database[j]] for j in evaluation.top_ids[i] if j >= 0)
        rows.append(row)
    _write_rows(path, rows)


def _count(value: float) -> int | float:
    """Hits are whole numbers except under the tie-aware rule, where a tie counts fractionally."""
    return int(value) if float(value).is_integer() else round(float(value), 4)


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _rounded(value):
    """Six decimals: metrics are means over at most millions of queries."""
    return round(value, 6) if isinstance(value, float) else value


def _write_rows(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    rows = [{k: _rounded(v) for k, v in row.items()} for row in rows]
    fields = fields or (list(rows[0]) if rows else [])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_grid(path: Path, cfg, ds: data.Dataset, evaluation) -> None:
    """A few queries, drawn with a fixed seed, with their top results."""
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.eval.grid_queries, len(ds.query))
    picks = np.sort(rng.choice(len(ds.query), size=n, replace=False))
    results, relevant, scores = [], [], []
    for i in picks:
        ids = [j for j in evaluation.top_ids[i][: cfg.eval.grid_k] if j >= 0]
        results.append([ds.root / ds.items[ds.database[j]] for j in ids])
        relevant.append([ds.labels[ds.database[j]] == ds.labels[ds.query[i]] for j in ids])
        scores.append([float(s) for s in evaluation.top_scores[i][: len(ids)]])
    queries = [ds.root / ds.items[ds.query[i]] for i in picks]
    labels = [ds.class_names[ds.labels[ds.query[i]]] for i in picks]
    visualise.retrieval_grid(queries, results, relevant, scores, path, labels=labels)


def _write_crops(path: Path, ds: data.Dataset, crops) -> None:
    chosen = {int(i): b for i, b in zip(ds.query, crops.query, strict=True) if b}
    chosen.update({int(i): b for i, b in zip(ds.database, crops.database, strict=True) if b})
    lines = []
    for item, det in sorted(crops.detections.items()):
        record = {"id": ds.items[item], "detections": det.to_record() if det else None}
        record["chosen"] = [list(b) for b in chosen.get(item, [])] or "fallback"
        lines.append(json.dumps(record))
    cache.write_atomic(path, ("\n".join(lines) + "\n").encode())
