"""Figures a single run leaves behind: the retrieval grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from visual_search.images import DecodeError, load_rgb

RELEVANT, NOT_RELEVANT, QUERY = "#1a9850", "#d73027", "#2c7bb6"


def retrieval_grid(
    queries: Sequence[Path],
    results: Sequence[Sequence[Path]],
    relevant: Sequence[Sequence[bool]],
    scores: Sequence[Sequence[float]] | None,
    path: Path,
    thumb: int = 128,
    labels: Sequence[str] | None = None,
) -> Path:
    """Save a grid: one row per query (blue frame), then its top results, framed green when
    relevant and red when not, each titled with its rank and cosine similarity (the rank alone
    when `scores` is None)."""
    cols = 1 + max((len(r) for r in results), default=0)
    fig = figure(figsize=(1.5 * cols, 1.65 * len(queries)))
    axes = fig.subplots(len(queries), cols, squeeze=False)
    for row, query in enumerate(queries):
        title = f"query\n{labels[row]}" if labels else "query"
        _tile(axes[row][0], query, QUERY, title, thumb)
        row_scores = scores[row] if scores is not None else [None] * len(results[row])
        for col, (hit, is_rel, score) in enumerate(
            zip(results[row], relevant[row], row_scores, strict=True), start=1
        ):
            colour = RELEVANT if is_rel else NOT_RELEVANT
            title = f"#{col}" if score is None else f"#{col}  {score:.3f}"
            _tile(axes[row][col], hit, colour, title, thumb)
        for col in range(1 + len(results[row]), cols):
            axes[row][col].axis("off")
    fig.suptitle("Query (blue) and top results: green relevant, red not", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def figure(**kwargs) -> Figure:
    """A figure drawn by Agg, outside pyplot: it never touches the session's backend (a
    notebook's inline plots stay inline), needs no display, and is freed with its last use."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _tile(ax, image_path: Path, colour: str, title: str, thumb: int) -> None:
    try:
        image = load_rgb(image_path)
        image.thumbnail((thumb, thumb))
    except DecodeError:
        image = Image.new("RGB", (thumb, thumb), (200, 200, 200))
    ax.imshow(image)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)
