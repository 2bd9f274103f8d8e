"""The paper's figures from tracked runs, in one style, saved as PNG and PDF.

Every function takes `report.Row`s (and, for the per-image figures, files the runs logged) and
writes ``<stem>.png`` and ``<stem>.pdf``; none needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
from adjustText import adjust_text

from visual_search.report import Row, pareto_front
from visual_search.visualise import figure

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 200, "font.size": 9, "axes.titlesize": 10,
    "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "savefig.bbox": "tight", "pdf.fonttype": 42,
}  # fmt: skip
MARKERS = "osD^vP*Xh<>"
# One colour and marker per index config in every figure, whichever indexes a figure shows.
INDEXES = ("flat", "hnsw", "ivf_flat", "ivf_pq", "opq_ivf_pq", "pq", "sq8", "factory")


def _style_of(index: str) -> tuple[str, str]:
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    i = INDEXES.index(index) if index in INDEXES else len(INDEXES) + sum(map(ord, index))
    return colours[i % len(colours)], MARKERS[i % len(MARKERS)]


def _log_axis(axis) -> None:
    """Log scale labelled as plain numbers: at 1, 2 and 5 of each decade, or, where the data
    span less than a factor of four, at evenly spaced round values, so no axis has one label."""
    low, high = axis.get_view_interval()
    locator = (matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)) if high > 4 * low
               else matplotlib.ticker.MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))  # fmt: skip
    axis.set_major_locator(locator)
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def save(fig, out: Path, stem: str) -> list[Path]:
    """PNG and PDF of `fig` (no creation date in the PDF, so reruns differ only in pixels)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0])
    fig.savefig(paths[1], metadata={"CreationDate": None})
    return paths


def _datasets(rows: Sequence[Row]) -> list[str]:
    return sorted({r.dataset for r in rows})


def tradeoff(rows: Sequence[Row], x: str, y: str, out: Path, stem: str, xlabel: str,
             ylabel: str, title: str, x_scale: float = 1.0) -> list[Path] | None:  # fmt: skip
    """y against x (log axis) per dataset, one marker per index type, the Pareto front (higher y,
    lower x) drawn as a step line with its points labelled."""
    plotted = {r.dataset for r in rows if _finite(r, x) and _finite(r, y)}
    datasets = [d for d in _datasets(rows) if d in plotted]
    if not datasets:
        return None
    with matplotlib.rc_context(STYLE):
        ncols = min(2, len(datasets))
        nrows = math.ceil(len(datasets) / ncols)
        fig = figure(figsize=(6.0 * ncols, 4.2 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[len(datasets) :]:
            ax.set_visible(False)
        indexes = sorted({r.index for r in rows}, key=lambda n: (n not in INDEXES, n))
        for ax, dataset in zip(axes.flat, datasets, strict=False):
            points = [r for r in rows if r.dataset == dataset and _finite(r, x) and _finite(r, y)]
            xs = np.array([r[x] * x_scale for r in points])
            ys = np.array([r[y] for r in points])
            for name in indexes:
                colour, marker = _style_of(name)
                for cropped in (False, True):
                    mine = [j for j, r in enumerate(points)
                            if r.index == name and (r.roi != "none") == cropped]  # fmt: skip
                    if mine:
                        ax.scatter(xs[mine], ys[mine], marker=marker, s=26,
                                   label=None if cropped else name, alpha=0.85,
                                   facecolors="none" if cropped else colour,
                                   edgecolors=colour)  # fmt: skip
            front = pareto_front(np.column_stack([ys, xs]), maximise=[True, False])
            order = np.argsort(xs[front])
            ax.step(xs[front][order], ys[front][order], where="post", color="black", lw=0.8,
                    alpha=0.6, label="Pareto front")  # fmt: skip
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(dataset)
            # Label the front's points, moved apart where they would overlap (adjustText's
            # placement is seeded, so the same runs give the same figure).
            labels = [ax.text(xs[j], ys[j], _short(points[j]), fontsize=6.5)
                      for j in np.flatnonzero(front)]  # fmt: skip
            adjust_text(labels, x=xs, y=ys, ax=ax, expand=(1.1, 1.3),
                        arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})  # fmt: skip
        handles = {}
        for ax in axes.flat[: len(datasets)]:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncols=len(handles),
                   frameon=False, bbox_to_anchor=(0.5, 0.0))  # fmt: skip
        fig.suptitle(f"{title} (filled: whole images; hollow: ROI crops)")
        fig.tight_layout(rect=(0, 0.06 / nrows, 1, 1))
        return save(fig, out, stem)


def _short(row: Row) -> str:
    search = "" if row.search == "-" else " " + row.search.split("=")[-1]
    roi = "" if row.roi == "none" else " +roi"
    return f"{row.index}{search}{roi}"


def _finite(row: Row, name: str) -> bool:
    value = row[name]
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def roi_intervals(rows: Sequence[Row], out: Path, stem: str = "roi_vs_whole") -> list[Path] | None:
    """ΔmAP (ROI - whole image) with its 95% bootstrap interval, one line per ROI setting."""
    roi_rows = [r for r in rows if r.roi != "none" and r.factory == "Flat"
                and math.isfinite(r.metrics["map_delta"])]  # fmt: skip
    if not roi_rows:
        return None
    roi_rows.sort(key=lambda r: (r.dataset, r.roi, r.padding))
    with matplotlib.rc_context(STYLE):
        fig = figure(figsize=(6.0, 0.22 * len(roi_rows) + 1.2))
        ax = fig.subplots()
        ys = np.arange(len(roi_rows))[::-1]
        datasets = _datasets(roi_rows)
        colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for y, r in zip(ys, roi_rows, strict=True):
            m = r.metrics
            colour = colours[datasets.index(r.dataset) % len(colours)]
            ax.errorbar(m["map_delta"], y, xerr=[[m["map_delta"] - m["map_delta_ci_low"]],
                                                 [m["map_delta_ci_high"] - m["map_delta"]]],
                        fmt="o", ms=3, color=colour, capsize=2)  # fmt: skip
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(ys, [f"{r.dataset}: {r.roi} (pad {r.padding:g})" for r in roi_rows],
                      fontsize=6)  # fmt: skip
        ax.set_xlabel("ΔmAP, ROI crop − whole image (95% bootstrap CI)")
        ax.set_title("Does cropping to the detected object help?")
        ax.grid(axis="y", alpha=0)
        return save(fig, out, stem)


def per_class(
    tables: dict[str, list[dict]], out: Path, stem: str = "per_class_ap"
) -> list[Path] | None:
    """Per-class mAP of each dataset's best configuration (`tables`: dataset -> per_class.csv
    rows, the title naming the configuration), sorted."""
    if not tables:
        return None
    with matplotlib.rc_context(STYLE):
        heights = [max(2.0, 0.13 * len(rows) + 0.8) for rows in tables.values()]
        fig = figure(figsize=(6.0, sum(heights)))
        axes = fig.subplots(len(tables), 1, squeeze=False, height_ratios=heights)
        for ax, (title, rows) in zip(axes[:, 0], tables.items(), strict=True):
            rows = sorted(rows, key=lambda r: float(r["map"]))
            ax.barh([r["class"] for r in rows], [float(r["map"]) for r in rows], height=0.7)
            ax.set_xlim(0, 1)
            ax.set_xlabel("mAP of the class's queries")
            ax.tick_params(axis="y", labelsize=5 if len(rows) > 30 else 7)
            ax.set_title(title, fontsize=8)
            ax.grid(axis="y", alpha=0)
        return save(fig, out, stem)


def explanations(panels: list[tuple[str, str, str, object]], out: Path,
                 stem: str = "gradcam") -> list[Path] | None:  # fmt: skip
    """Query | match pairs with their Grad-CAM overlays.

    `panels` holds (row title, query label, match label, Explanation) per pair.
    """
    if not panels:
        return None
    with matplotlib.rc_context(STYLE):
        fig = figure(figsize=(4.6, 2.5 * len(panels)))
        axes = fig.subplots(len(panels), 2, squeeze=False)
        for (title, query_label, match_label, explanation), row in zip(panels, axes, strict=True):
            query, match = explanation.overlays()[0]
            cosine = explanation.similarity[0]
            for ax, image, text in ((row[0], query, f"{title}\nquery: {query_label}"),
                                    (row[1], match, f"top match: {match_label}\ncosine "
                                                    f"{cosine:.3f}")):  # fmt: skip
                ax.imshow(image)
                ax.axis("off")
                ax.set_title(text, fontsize=7)
        fig.suptitle("Grad-CAM of the query–match cosine similarity\n(red: what raises it)",
                     fontsize=9)  # fmt: skip
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
        return save(fig, out, stem)
