"""Tables built from tracked runs, and the Pareto front of quality against cost."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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


def markdown_table(rows: list[dict], columns: Sequence[str], formats: dict[str, str]) -> str:
    """A Markdown table; `formats` maps a column to a format spec such as ``.3f``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            spec = formats.get(c)
            ok = spec and isinstance(value, int | float) and np.isfinite(value)
            cells.append(format(value, spec) if ok else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
