"""The report: tables and figures from tracked runs, on fixed inputs and on a real small sweep."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import matplotlib
import matplotlib.pyplot as plt
import pytest

from visual_search import figures, report
from visual_search.report import Row

from .conftest import DATA, REPO, needs
from .test_sweep import _multirun


def _row(dataset, index, factory, search, map_, p50, nbytes, roi="none", **extra) -> Row:
    metrics = {k: math.nan for k in report.METRICS}
    metrics.update(map=map_, precision_at_10=map_ + 0.05, recall_at_1=map_ + 0.1,
                   ms_per_query_p50=p50, ms_per_query_p95=2 * p50, index_bytes=nbytes,
                   neighbour_recall_at_10=1.0 if factory == "Flat" else 0.9, **extra)  # fmt: skip
    return Row(f"run-{dataset}-{index}-{search}-{roi}", f"run-{dataset}-{index}-{search}-{roi}",
               dataset, "leave_one_out", roi, 0.1 if roi != "none" else math.nan, index,
               factory, search, metrics)  # fmt: skip


ROWS = [
    _row("corel1k", "flat", "Flat", "-", 0.888, 0.18, 5_120_000),
    _row("corel1k", "hnsw", "HNSW32", "efSearch=32", 0.895, 0.033, 5_390_000),
    _row("corel1k", "sq8", "SQ8", "-", 0.888, 0.11, 1_290_000),
    _row("corel1k", "flat", "Flat", "-", 0.823, 0.20, 5_120_000, roi="largest/query",
         map_delta=-0.065, map_delta_ci_low=-0.077, map_delta_ci_high=-0.053,
         recall_at_1_delta=-0.06, recall_at_1_delta_ci_low=-0.08, recall_at_1_delta_ci_high=-0.04,
         baseline_map=0.888, roi_fallback_rate=0.284),
]  # fmt: skip


def test_main_table_in_markdown_and_latex():
    table = report.main_table(ROWS)
    md = report.markdown_table(table, report.MAIN_COLUMNS, report.FORMATS, report.MAIN_HEADERS)
    lines = md.splitlines()
    assert lines[0] == "| dataset | configuration | mAP | P@10 | R@1 | p50 ms | p95 ms | index MB |"
    assert (
        lines[3]
        == "| corel1k | HNSW32 efSearch=32 | 0.895 | 0.945 | 0.995 | 0.033 | 0.066 | 5.39 |"
    )
    assert "Flat, roi largest/query pad 0.1" in lines[5]
    tex = report.latex_table(table, report.MAIN_COLUMNS, report.FORMATS, report.MAIN_HEADERS,
                             "Results & costs", "tab:main")  # fmt: skip
    assert r"\begin{tabular}{llrrrrrr}" in tex and r"\toprule" in tex
    assert r"HNSW32 efSearch=32 & 0.895 & 0.945 & 0.995 & 0.033 & 0.066 & 5.39 \\" in tex
    assert r"\caption{Results \& costs}" in tex


def test_roi_table_keeps_exact_roi_rows_with_their_intervals():
    (row,) = report.roi_table(ROWS)
    assert row["roi"] == "largest/query (pad 0.1)"
    assert row["map_ci"] == "-0.065 [-0.077, -0.053]" and row["whole_map"] == 0.888
    assert report.latex_escape("ΔmAP 5% a_b") == r"$\Delta$mAP 5\% a\_b"


def test_runs_that_change_relevance_size_ties_or_embedder_never_replace_the_full_protocol(
    tmp_path,
):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("visual-search-grocery_natural")
    base = {"dataset.name": "grocery_natural", "dataset.protocol": "natural",
            "dataset.relevance": "fine", "dataset.limit_per_class": "None",
            "eval.ties": "pessimistic", "embedder.library": "torchvision",
            "embedder.arch": "mobilenet_v2", "roi.policy": "none", "index.name": "flat",
            "index.factory": "Flat"}  # fmt: skip
    variants = [
        ({}, 0.40),
        ({"dataset.relevance": "Relevance.coarse"}, 0.44),
        ({"dataset.limit_per_class": "3"}, 0.90),
        ({"eval.ties": "optimistic"}, 0.41),
        ({"embedder.library": "timm", "embedder.arch": "mobilenetv2_100"}, 0.42),
    ]
    for extra, map_ in variants:  # the full protocol first, so every variant is newer
        run_id = client.create_run(experiment).info.run_id
        for key, value in {**base, **extra}.items():
            client.log_param(run_id, key, value)
        client.log_metric(run_id, "map", map_)
        client.set_terminated(run_id)
    rows = {(r.dataset, r.configuration): r.metrics["map"] for r in report.load_runs(uri)}
    assert rows == {
        ("grocery_natural", "Flat"): 0.40,
        ("grocery_natural (coarse)", "Flat"): 0.44,
        ("grocery_natural (3 per class)", "Flat"): 0.90,
        ("grocery_natural (ties optimistic)", "Flat"): 0.41,
        ("grocery_natural", "timm/mobilenetv2_100, Flat"): 0.42,
    }


def test_index_table_marks_the_pareto_front_within_each_dataset_and_roi_setting():
    spec = importlib.util.spec_from_file_location(
        "index_table", REPO / "experiments" / "index_table.py"
    )
    index_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(index_table)
    lines = index_table.table(ROWS).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:6]] for line in lines[2:]]
    assert cells == [
        ["*", "corel1k", "largest/query pad 0.1", "flat", "-"],  # alone in its group
        ["*", "corel1k", "none", "hnsw", "efSearch=32"],  # best mAP and fastest
        ["", "corel1k", "none", "flat", "-"],  # sq8: same mAP, faster and smaller
        ["*", "corel1k", "none", "sq8", "-"],  # smallest
    ]


def test_the_readme_block_takes_exact_whole_image_runs_of_full_datasets_only(tmp_path):
    spec = importlib.util.spec_from_file_location("report_cli", REPO / "experiments" / "report.py")
    report_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_cli)
    subset = _row("corel1k (3 per class)", "flat", "Flat", "-", 0.95, 0.01, 1000)
    subset.standard = False
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nOLD\n<!-- results:end -->\nrest\n")
    report_cli.update_readme(readme, [*ROWS, subset])
    lines = readme.read_text().splitlines()
    assert lines[0] == "intro" and lines[-1] == "rest" and "OLD" not in lines
    rows = [line for line in lines if line.startswith("| corel1k")]
    assert len(rows) == 1 and "| 0.888 |" in rows[0]  # Flat, whole images; not HNSW, ROI or subset
    report_cli.update_readme(readme, [subset])  # nothing to show: the block is left alone
    assert [line for line in readme.read_text().splitlines() if line.startswith("|")][2] == rows[0]


def test_missing_numbers_print_as_a_dash():
    row = {"a": math.nan, "b": 1.5}
    assert report.markdown_table([row], ["a", "b"], {"a": ".2f", "b": ".1f"}).endswith(
        "| - | 1.5 |"
    )


def test_figures_are_written_as_png_and_pdf_without_a_display(tmp_path):
    backend = matplotlib.get_backend()
    made = [
        figures.tradeoff(ROWS, "ms_per_query_p50", "map", tmp_path, "q_lat", "ms", "mAP", "t"),
        figures.tradeoff(
            ROWS, "index_bytes", "map", tmp_path, "q_bytes", "MB", "mAP", "t", x_scale=1e-6
        ),  # fmt: skip
        figures.roi_intervals(ROWS, tmp_path),
        figures.per_class(
            {"corel1k": [{"class": "buses", "map": "0.9"}, {"class": "food", "map": "0.6"}]},
            tmp_path,
        ),  # fmt: skip
    ]
    for paths in made:
        assert [p.suffix for p in paths] == [".png", ".pdf"]
        assert all(p.stat().st_size > 5_000 for p in paths)
    assert figures.roi_intervals(ROWS[:3], tmp_path) is None  # no ROI rows: no figure
    # Drawn outside pyplot: a notebook's backend and open figures are left as they were.
    assert matplotlib.get_backend() == backend and plt.get_fignums() == []


def test_without_any_display_variable_in_a_fresh_process(tmp_path):
    code = ("from pathlib import Path; from visual_search import figures; "
            "from tests.test_report import ROWS; "
            f"figures.tradeoff(ROWS, 'ms_per_query_p50', 'map', Path(r'{tmp_path}'), 'x', 'ms', "
            "'mAP', 't')")  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MPLBACKEND": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "x.png").is_file()


@pytest.mark.slow
def test_report_from_a_real_sweep_twice_gives_identical_tables(tmp_path):
    needs(DATA / "corel1k")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _multirun(tmp_path, uri, "dataset.limit_per_class=3", "index=flat,hnsw", "roi=none,yolo")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nOLD-TABLE\n<!-- results:end -->\nrest\n")
    env = {**__import__("os").environ, "VISUAL_SEARCH_DATA": str(DATA),
           "VISUAL_SEARCH_CACHE": str(tmp_path / "cache")}  # fmt: skip

    def make(name: str) -> dict[str, bytes]:
        proc = subprocess.run(
            [sys.executable, str(REPO / "experiments" / "report.py"), "--name", name,
             "--out", str(tmp_path / "reports"), "--uri", uri, "--readme", str(readme)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        tables = tmp_path / "reports" / name / "tables"
        return {p.name: p.read_bytes() for p in sorted(tables.iterdir())}

    first, second = make("a"), make("b")
    assert first == second and set(first) == {"main.md", "main.tex", "roi.md", "roi.tex"}
    out = tmp_path / "reports" / "a"
    stems = {p.stem for p in (out / "figures").iterdir()}
    assert {"quality_vs_latency", "quality_vs_bytes", "recall_vs_latency", "roi_vs_whole",
            "per_class_ap", "examples_corel1k-3-per-class", "gradcam"} <= stems  # fmt: skip
    text = (out / "report.md").read_text()
    assert "## Main results" in text and "## ROI study" in text
    assert text.count("| `") >= 4  # the run list: one row per configuration
    # 3 images per class is no result for the README: its table stays as it was.
    assert (
        readme.read_text()
        == "intro\n<!-- results:begin -->\nOLD-TABLE\n<!-- results:end -->\nrest\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uri", "sqlite:///{tmp}/none/mlflow.db"], "no MLflow store at"),
        (["--uri", "http://127.0.0.1:1"], "does not answer"),
        (["--uri", "sqlite:///{tmp}/m.db", "--readme", "{tmp}/README.md"], "needs one <!--"),
        (["--uri", "sqlite:///{tmp}/m.db", "--sweep", "deadbeef"], "of sweep deadbeef"),
        (["--uri", "sqlite:///{tmp}/m.db", "--filter", "metrics.map >"], "Invalid clause"),
    ],
)
def test_report_command_names_what_it_cannot_use_in_one_line(tmp_path, args, message):
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}").create_experiment("visual-search-x")
    (tmp_path / "README.md").write_text("<!-- results:end -->\n<!-- results:begin -->\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "report.py"), "--out", str(tmp_path / "out"),
         *(a.format(tmp=tmp_path) for a in args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()
