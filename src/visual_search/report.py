"""Tables built from tracked runs, and the Pareto front of quality against cost.

`load_runs` reads MLflow runs (a sweep's jobs, or every run of the experiments) into one row per
configuration: the latest run of each dataset x ROI x index x search setting. The table
builders turn those rows into the paper's tables, as Markdown and LaTeX, with numbers from the
tracked runs only; rows are sorted, so the same runs always give the same tables.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Metrics every row carries (NaN where a run has none, e.g. latency of an untimed run).
METRICS = (
    "map", "precision_at_10", "recall_at_1", "recall_at_10", "ms_per_query_p50",
    "ms_per_query_p95", "neighbour_recall_at_10", "index_bytes", "index_build_s", "batch_qps",
    "baseline_map", "baseline_recall_at_1", "map_delta", "map_delta_ci_low", "map_delta_ci_high",
    "recall_at_1_delta", "recall_at_1_delta_ci_low", "recall_at_1_delta_ci_high",
    "roi_fallback_rate", "n_queries", "n_database",
)  # fmt: skip


DEFAULT_EMBEDDER = "torchvision/mobilenet_v2"


@dataclass
class Row:
    """One configuration's tracked result."""

    run_id: str
    config_run_id: str  # holds config.yaml and the per-query files
    dataset: str  # the dataset's name, with what changes its relevance or size, e.g. "(coarse)"
    protocol: str
    roi: str  # "none", or "policy/side"
    padding: float
    index: str
    factory: str
    search: str  # e.g. "efSearch=32", or "-"
    metrics: dict[str, float] = field(default_factory=dict)
    embedder: str = DEFAULT_EMBEDDER  # library/arch
    standard: bool = True  # every image of the dataset, ties broken pessimistically

    @property
    def configuration(self) -> str:
        """The FAISS factory string, its search setting and the ROI setting."""
        search = "" if self.search == "-" else f" {self.search}"
        roi = "" if self.roi == "none" else f", roi {self.roi} pad {self.padding:g}"
        embedder = "" if self.embedder == DEFAULT_EMBEDDER else f"{self.embedder}, "
        return f"{embedder}{self.factory}{search}{roi}"

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name) if hasattr(self, name) else self.metrics.get(name, math.nan)


def load_runs(uri: str, sweep: str | None = None, prefix: str = "visual-search-",
              filter_string: str = "") -> list[Row]:  # fmt: skip
    """Finished runs at `uri` (only `sweep`'s jobs when given), the latest per configuration.

    A run with a search grid is represented by its nested runs, one per setting.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()
                   if e.name.startswith(prefix)]  # fmt: skip
    if not experiments:
        return []
    filters = ["attributes.status = 'FINISHED'"] + ([filter_string] if filter_string else [])
    if sweep:
        filters.append(f"tags.sweep_run_id = '{sweep}'")
    runs = []
    token = None
    while True:
        page = client.search_runs(
            experiments, " and ".join(filters), max_results=1000,
            order_by=["attributes.start_time ASC"], page_token=token,
        )  # fmt: skip
        runs += list(page)
        token = page.token
        if not token:
            break
    with_children = {r.data.tags.get("mlflow.parentRunId") for r in runs
                     if any(k.startswith("search.") and k.count(".") == 1
                            and k not in ("search.k", "search.max_pairs_per_chunk")
                            for k in r.data.params)}  # fmt: skip
    latest: dict[tuple, Row] = {}
    for run in runs:
        if run.info.run_id in with_children:
            continue  # its nested runs stand for it, one per search setting
        row = _row(run)
        if row is None:
            continue
        latest[(row.dataset, row.protocol, row.embedder, row.roi, row.padding, row.index,
                row.factory, row.search)] = row  # fmt: skip
    return sorted(latest.values(), key=_order)


def _row(run) -> Row | None:
    p = run.data.params
    if "dataset.name" not in p or "map" not in run.data.metrics:
        return None
    policy = _value(p.get("roi.policy", "none"))
    roi = "none" if policy == "none" else f"{policy}/{_value(p.get('roi.side', '?'))}"
    search = ",".join(
        f"{k.removeprefix('search.')}={v}" for k, v in sorted(p.items())
        if k.startswith("search.") and k.count(".") == 1
        and k not in ("search.k", "search.max_pairs_per_chunk")
    ) or "-"  # fmt: skip
    # Settings that change what counts as relevant, or which images take part, make another
    # dataset as far as comparisons go: their runs never stand in for the full protocol's.
    relevance = _value(p.get("dataset.relevance", "fine"))
    ties = _value(p.get("eval.ties", "pessimistic"))
    limit = p.get("dataset.limit_per_class", "None")
    limited = limit not in ("None", "")
    variant = [relevance] if relevance != "fine" else []
    variant += [f"ties {ties}"] if ties != "pessimistic" else []
    variant += [f"{limit} per class"] if limited else []
    dataset = p["dataset.name"] + (f" ({', '.join(variant)})" if variant else "")
    parent = run.data.tags.get("mlflow.parentRunId")
    own_config = search == "-" or not parent
    return Row(
        run_id=run.info.run_id,
        config_run_id=run.info.run_id if own_config else parent,
        dataset=dataset,
        protocol=_value(p.get("dataset.protocol", "")),
        roi=roi,
        padding=float(p.get("roi.padding", "nan")) if policy != "none" else math.nan,
        index=p.get("index.name", "?"),
        factory=p.get("index.factory", "?"),
        search=search,
        embedder=f"{p.get('embedder.library', '?')}/{p.get('embedder.arch', '?')}",
        standard=ties == "pessimistic" and not limited,
        metrics={k: float(run.data.metrics.get(k, math.nan)) for k in METRICS},
    )


def _value(param: str) -> str:
    """An enum param's value: early runs logged "RoiPolicy.all" where later ones log "all"."""
    head, _, tail = param.partition(".")
    return tail if tail and head[:1].isupper() and head.isidentifier() else param


def _order(row: Row):
    return (row.dataset, row.roi != "none", row.roi, row.index, _natural(row.search), row.run_id)


def _natural(text: str) -> tuple:
    """Numbers in `text` compared as numbers: "nprobe=2" before "nprobe=16"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def pareto_front(values: np.ndarray, maximise: Sequence[bool]) -> np.ndarray:
    """Mark the points no other point beats on every objective at once.

    Args:
        values: (n, m) objectives per point, e.g. columns (map, ms_per_query_p50, index_bytes).
        maximise: per column, True when higher is better.

    Returns:
        (n,) bool, True for points on the front. A point is dominated when another is at least
        as good on every objective and strictly better on one; equal points are both kept.
        Rows with NaN are never on the front.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != len(maximise):
        raise ValueError(f"values must be (n, {len(maximise)}), got shape {v.shape}")
    v = np.where(np.asarray(maximise), -v, v)  # now lower is better everywhere
    finite = np.isfinite(v).all(axis=1)
    front = finite.copy()
    for i in np.flatnonzero(finite):
        others = v[finite]
        dominated = (others <= v[i]).all(axis=1) & (others < v[i]).any(axis=1)
        front[i] = not dominated.any()
    return front


# Tables ------------------------------------------------------------------------------------

MAIN_COLUMNS = ["dataset", "configuration", "map", "precision_at_10", "recall_at_1",
                "ms_per_query_p50", "ms_per_query_p95", "index_mb"]  # fmt: skip
MAIN_HEADERS = {"dataset": "dataset", "configuration": "configuration", "map": "mAP",
                "precision_at_10": "P@10", "recall_at_1": "R@1", "ms_per_query_p50": "p50 ms",
                "ms_per_query_p95": "p95 ms", "index_mb": "index MB", "roi": "ROI",
                "map_ci": "ΔmAP [95% CI]", "recall_ci": "ΔR@1 [95% CI]",
                "whole_map": "whole mAP", "roi_fallback_rate": "fallback"}  # fmt: skip
FORMATS = {"map": ".3f", "precision_at_10": ".3f", "recall_at_1": ".3f",
           "ms_per_query_p50": ".3f", "ms_per_query_p95": ".3f", "index_mb": ".2f",
           "whole_map": ".3f", "roi_fallback_rate": ".3f"}  # fmt: skip


def main_table(rows: Sequence[Row]) -> list[dict]:
    """Dataset x configuration -> mAP, P@10, R@1, latency p50/p95, index size."""
    return [
        {"dataset": r.dataset, "configuration": r.configuration,
         **{k: r.metrics[k] for k in MAIN_COLUMNS[2:-1]},
         "index_mb": r.metrics["index_bytes"] / 1e6}
        for r in rows
    ]  # fmt: skip


ROI_COLUMNS = ["dataset", "roi", "map", "whole_map", "map_ci", "recall_at_1", "recall_ci",
               "roi_fallback_rate"]  # fmt: skip


def roi_table(rows: Sequence[Row]) -> list[dict]:
    """The ROI rows (exact index only) with their paired differences against whole images."""
    out = []
    for r in rows:
        if r.roi == "none" or r.factory != "Flat":
            continue
        m = r.metrics
        out.append({
            "dataset": r.dataset, "roi": f"{r.roi} (pad {r.padding:g})", "map": m["map"],
            "whole_map": m["baseline_map"], "recall_at_1": m["recall_at_1"],
            "map_ci": _ci(m["map_delta"], m["map_delta_ci_low"], m["map_delta_ci_high"]),
            "recall_ci": _ci(m["recall_at_1_delta"], m["recall_at_1_delta_ci_low"],
                             m["recall_at_1_delta_ci_high"]),
            "roi_fallback_rate": m["roi_fallback_rate"],
        })  # fmt: skip
    return out


def _ci(delta: float, low: float, high: float) -> str:
    if not all(map(math.isfinite, (delta, low, high))):
        return "-"
    return f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"


def _cell(value, spec: str | None) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    if spec and isinstance(value, int | float):
        return format(value, spec)
    return str(value)


def markdown_table(rows: list[dict], columns: Sequence[str], formats: dict[str, str],
                   headers: dict[str, str] | None = None) -> str:  # fmt: skip
    """A Markdown table; `formats` maps a column to a format spec such as ``.3f``; missing
    numbers print as '-'."""
    headers = headers or {}
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
             "|" + "---|" * len(columns)]  # fmt: skip
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, ""), formats.get(c)) for c in columns)
                     + " |")  # fmt: skip
    return "\n".join(lines)


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "\\": r"\textbackslash{}",
                  "Δ": r"$\Delta$"}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex_table(rows: list[dict], columns: Sequence[str], formats: dict[str, str],
                headers: dict[str, str] | None = None, caption: str = "",
                label: str = "") -> str:  # fmt: skip
    """A booktabs LaTeX table with the same cells as `markdown_table`."""
    headers = headers or {}
    numeric = [all(isinstance(r.get(c), int | float) for r in rows) and rows for c in columns]
    spec = "".join("r" if n else "l" for n in numeric)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(headers.get(c, c)) for c in columns) + r" \\",
             r"\midrule"]  # fmt: skip
    for row in rows:
        cells = [latex_escape(_cell(row.get(c, ""), formats.get(c))) for c in columns]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
