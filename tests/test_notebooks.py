"""Every analysis notebook runs top to bottom on a small tracked sweep made here."""

from __future__ import annotations

import pytest

from .conftest import DATA, MODELS, REPO, needs
from .test_sweep import _multirun

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Corel-1k, 3 images per class, whole images and YOLO crops, exact and HNSW search."""
    needs(DATA / "corel1k")
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    _multirun(tmp, uri, "dataset.limit_per_class=3", "index=flat,hnsw", "roi=none,yolo")
    return {"MLFLOW_TRACKING_URI": uri, "VISUAL_SEARCH_CACHE": str(tmp / "cache"),
            "VISUAL_SEARCH_DATA": str(DATA), "VISUAL_SEARCH_MODELS": str(MODELS)}  # fmt: skip


def test_the_notebooks_are_numbered_and_stripped():
    import nbformat

    assert [p.stem[:3] for p in NOTEBOOKS] == ["01-", "02-", "03-", "04-", "05-"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        assert book.cells[0].cell_type == "markdown" and book.cells[0].source.startswith("# ")
        assert book.cells[0].source.splitlines()[0].endswith("?")  # each opens with its question
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, sweep, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for name, value in sweep.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    book = nbformat.read(path, as_version=4)
    work = tmp_path / "notebooks"
    work.mkdir()
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(work)}}).execute()  # fmt: skip
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]  # fmt: skip
    assert not errors
    if "plt." in "".join(c.source for c in book.cells):  # its plots reach the page
        images = [o for c in book.cells if c.cell_type == "code" for o in c.outputs
                  if "image/png" in o.get("data", {})]  # fmt: skip
        assert images, f"{path.name} drew no figure"
