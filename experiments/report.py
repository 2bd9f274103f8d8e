"""Every figure and table of the report, from tracked MLflow runs.

    python experiments/report.py [--name NAME] [--sweep RUN_ID ...] [--filter MLFLOW_FILTER]
                                 [--uri URI] [--readme README.md] [--no-images]

Reads the finished runs (only the jobs of the given sweeps' parent runs, when given; the latest
run of each configuration) and writes ``reports/NAME/``:

- ``tables/main.{md,tex}``: dataset x configuration -> mAP, P@10, R@1, latency p50/p95, size;
- ``tables/roi.{md,tex}``: the ROI study with its paired bootstrap intervals;
- ``figures/*.{png,pdf}``: quality against latency and against index size with the Pareto
  front, neighbour recall against latency, ROI against whole image, per-class AP, the best and
  worst queries' results, and Grad-CAM of query-match pairs;
- ``report.md``: all of it, with the run id and configuration behind every row.

With ``--readme``, the README's results table (between ``<!-- results:begin -->`` and
``<!-- results:end -->``) is rewritten from the same runs. Tables depend on the runs alone:
the same runs give byte-identical tables.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from visual_search import figures, report
from visual_search.report import Row
from visual_search.tracking import TrackingError, existing_store

log = logging.getLogger("report")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    args = _parse()
    if args.readme:
        readme_block(Path(args.readme))  # a README it cannot update fails before any work
    try:
        uri = existing_store(args.uri, "--uri")
    except TrackingError as err:
        raise SystemExit(str(err)) from err
    rows: list[Row] = []
    try:
        for sweep in args.sweep or [None]:
            rows += report.load_runs(uri, sweep, args.prefix, args.filter)
    except Exception as err:  # noqa: BLE001 -- MLflow and its database raise many kinds
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise SystemExit(f"cannot read runs from {uri}: {first}") from err
    rows = sorted({r.run_id: r for r in rows}.values(), key=report._order)
    if not rows:
        which = f" of sweep {', '.join(args.sweep)}" if args.sweep else ""
        which += f" matching {args.filter!r}" if args.filter else ""
        raise SystemExit(f"no finished runs with metrics{which} at {uri}; run experiments first "
                         "or check the sweep's parent run id and the filter")  # fmt: skip
    out = Path(args.out) / args.name
    tables, figure_dir = out / "tables", out / "figures"
    tables.mkdir(parents=True, exist_ok=True)

    written = write_tables(rows, tables)
    made = make_figures(rows, figure_dir, uri, images=not args.no_images)
    (out / "report.md").write_text(report_md(args, uri, rows, written, made))
    if args.readme:
        update_readme(Path(args.readme), rows)
    log.info("wrote %s (%d runs, %d tables, %d figures)", out, len(rows), len(written), len(made))


def write_tables(rows: list[Row], out: Path) -> dict[str, str]:
    """tables/{main,roi}.{md,tex}; returns name -> Markdown."""
    found = {}
    specs = [
        ("main", report.main_table(rows), report.MAIN_COLUMNS,
         "Retrieval quality and search cost per dataset and configuration."),
        ("roi", report.roi_table(rows), report.ROI_COLUMNS,
         "ROI crop against the whole image: paired differences with 95% bootstrap intervals."),
    ]  # fmt: skip
    for name, table, columns, caption in specs:
        if not table:
            continue
        md = report.markdown_table(table, columns, report.FORMATS, report.MAIN_HEADERS)
        tex = report.latex_table(table, columns, report.FORMATS, report.MAIN_HEADERS, caption,
                                 f"tab:{name}")  # fmt: skip
        (out / f"{name}.md").write_text(md + "\n")
        (out / f"{name}.tex").write_text(tex)
        found[name] = md
    return found


def make_figures(rows: list[Row], out: Path, uri: str, images: bool) -> dict[str, str]:
    """Every figure the runs allow; returns stem -> what it shows."""
    made: dict[str, str] = {}

    def add(stem: str, paths, what: str) -> None:
        if paths:
            made[stem] = what

    add(
        "quality_vs_latency",
        figures.tradeoff(
            rows,
            "ms_per_query_p50",
            "map",
            out,
            "quality_vs_latency",
            "single-query latency p50 (ms, log scale)",
            "mAP",
            "Quality against search latency",
        ),
        "mAP against single-thread latency per dataset; the line is the Pareto front",
    )
    add(
        "quality_vs_bytes",
        figures.tradeoff(
            rows,
            "index_bytes",
            "map",
            out,
            "quality_vs_bytes",
            "index size (MB, log scale)",
            "mAP",
            "Quality against index size",
            x_scale=1e-6,
        ),
        "mAP against the index's size in memory",
    )
    approximate = [r for r in rows if r.factory != "Flat"]
    add("recall_vs_latency", figures.tradeoff(
        approximate, "ms_per_query_p50", "neighbour_recall_at_10", out, "recall_vs_latency",
        "single-query latency p50 (ms, log scale)", "neighbour recall@10 vs exact search",
        "How much of exact search's top 10 each index finds"),
        "neighbour recall@10 against exact search, for the approximate indexes")  # fmt: skip
    add(
        "roi_vs_whole",
        figures.roi_intervals(rows, out),
        "ΔmAP of each ROI setting against whole images, with 95% bootstrap intervals",
    )
    best = best_per_dataset(rows)
    per_class = {}
    for dataset, row in best.items():
        table = _artifact_csv(uri, row.config_run_id, "per_class.csv")
        if table:
            per_class[f"{dataset}: {row.configuration} (mAP {row.metrics['map']:.3f})"] = table
    add(
        "per_class_ap",
        figures.per_class(per_class, out),
        "per-class mAP of each dataset's best configuration",
    )
    if images:
        made.update(_image_figures(best, out, uri))
    return made


def best_per_dataset(rows: list[Row]) -> dict[str, Row]:
    """Each dataset's highest-mAP run among those that own their per-query files."""
    best: dict[str, Row] = {}
    for r in rows:
        if r.config_run_id != r.run_id or not math.isfinite(r.metrics["map"]):
            continue
        if r.dataset not in best or r.metrics["map"] > best[r.dataset].metrics["map"]:
            best[r.dataset] = r
    return dict(sorted(best.items()))


def _image_figures(best: dict[str, Row], out: Path, uri: str) -> dict[str, str]:
    """Best and worst queries of each dataset's best run, and Grad-CAM of two of its pairs."""
    from visual_search import data, embed
    from visual_search.explain import Explainer
    from visual_search.images import load_rgb
    from visual_search.serving import Choice, run_config
    from visual_search.visualise import retrieval_grid

    made, panels = {}, []
    paths = OmegaConf.create({
        "data": os.environ.get("VISUAL_SEARCH_DATA", "data"),
        "models": os.environ.get("VISUAL_SEARCH_MODELS", "models"),
        "cache": os.environ.get("VISUAL_SEARCH_CACHE", str(Path.home() / ".cache/visual-search")),
    })  # fmt: skip
    explainer = None
    for dataset, row in best.items():
        per_query = _artifact_csv(uri, row.run_id, "per_query.csv")
        if not per_query:
            continue
        choice = Choice(row.run_id, row.config_run_id, "", {}, {}, "")
        cfg = run_config(uri, choice, paths)
        ds = data.load_dataset(cfg.dataset)
        label_of = {item: ds.class_names[label] for item, label in zip(ds.items, ds.labels,
                                                                        strict=True)}  # fmt: skip
        ranked = sorted(per_query, key=lambda q: (float(q["ap"]), q["id"]))
        chosen = ranked[-3:][::-1] + ranked[:3]
        stem = "examples_" + re.sub(r"[^\w.-]+", "-", dataset).strip("-")
        for suffix in (".png", ".pdf"):  # the grid's own PNG, then the same grid as PDF
            retrieval_grid(
                [ds.root / q["id"] for q in chosen],
                [[ds.root / t for t in q["top_ids"].split()[:6]] for q in chosen],
                [[label_of.get(t) == q["label"] for t in q["top_ids"].split()[:6]]
                 for q in chosen],
                None, out / f"{stem}{suffix}",
                labels=[f"{q['label']}, AP {float(q['ap']):.2f}" for q in chosen],
            )  # fmt: skip
        made[stem] = f"{dataset}: the three best and three worst queries by AP, top 6 results"
        if explainer is None:
            cfg.embedder.backend = "torch"  # Grad-CAM needs the torch model only
            embedder = embed.build_embedder(cfg.embedder, cfg.paths.models, cfg.paths.cache)
            explainer = Explainer(embedder)
        for q, kind in ((ranked[-1], "best"), (ranked[0], "worst")):
            top = q["top_ids"].split()[0]
            explanation = explainer.explain([load_rgb(ds.root / q["id"])],
                                            [load_rgb(ds.root / top)])  # fmt: skip
            panels.append((f"{dataset}, {kind} query (AP {float(q['ap']):.2f})", q["label"],
                           label_of.get(top, "?"), explanation))  # fmt: skip
    if figures.explanations(panels, out):
        made["gradcam"] = "Grad-CAM of the best and the worst query against its top match"
    return made


def _artifact_csv(uri: str, run_id: str, name: str) -> list[dict]:
    from mlflow.artifacts import download_artifacts

    try:
        path = download_artifacts(run_id=run_id, artifact_path=name, tracking_uri=uri)
    except Exception as err:  # noqa: BLE001 -- MLflow raises several kinds for a missing file
        log.warning("run %s has no %s (%s); figure left out", run_id, name, err)
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def report_md(args, uri: str, rows: list[Row], tables: dict[str, str],
              made: dict[str, str]) -> str:  # fmt: skip
    lines = [f"# Report: {args.name}", "",
             f"From {len(rows)} tracked runs at `{uri}`"
             + (f", sweeps {', '.join(args.sweep)}" if args.sweep else "")
             + (f", filter `{args.filter}`" if args.filter else "") + ".",
             "Regenerate with `python experiments/report.py "
             + " ".join(_argv(args)) + "`.", ""]  # fmt: skip
    titles = {"main": "Main results", "roi": "ROI study"}
    for name, md in tables.items():
        lines += [f"## {titles[name]}", "", f"`tables/{name}.md`, `tables/{name}.tex`", "", md, ""]
    lines += ["## Figures", ""]
    for stem, what in made.items():
        lines += [f"### {stem}", "", what + ".", "", f"![{stem}](figures/{stem}.png)", ""]
    lines += ["## Runs", "", "| run | config run | dataset | configuration | padding |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        pad = "-" if math.isnan(r.padding) else f"{r.padding:g}"
        lines.append(f"| `{r.run_id}` | `{r.config_run_id}` | {r.dataset} | {r.configuration} "
                     f"| {pad} |")  # fmt: skip
    lines += ["", "Each run's resolved configuration is its `config.yaml` artifact in MLflow.", ""]
    return "\n".join(lines)


def _argv(args) -> list[str]:
    out = [f"--name {args.name}"]
    out += [f"--sweep {s}" for s in args.sweep or []]
    if args.filter:
        out.append(f'--filter "{args.filter}"')
    return out


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def readme_block(path: Path) -> str:
    """The README's text, when it has one results block to rewrite."""
    try:
        text = path.read_text()
    except OSError as err:
        raise SystemExit(f"--readme {path}: {err.strerror}") from err
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin or text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"--readme {path} needs one {README_BEGIN} line followed by one "
                         f"{README_END} line around its results table")  # fmt: skip
    return text


def update_readme(path: Path, rows: list[Row]) -> None:
    """Rewrite the README's results table: exact search on whole images, per dataset, from
    runs on every image with the default embedder and tie rule (a quick subset never stands in
    for a dataset's result)."""
    text = readme_block(path)
    exact = [r for r in rows if r.factory == "Flat" and r.roi == "none" and r.standard
             and r.embedder == report.DEFAULT_EMBEDDER]  # fmt: skip
    if not exact:
        log.warning("%s left as it is: no exact whole-image run of a full dataset with the "
                    "default embedder and tie rule among these runs", path)  # fmt: skip
        return
    table = report.markdown_table(
        [{"dataset": r.dataset, "protocol": r.protocol,
          "queries": f"{r.metrics['n_queries']:.0f}", "database": f"{r.metrics['n_database']:.0f}",
          "map": r.metrics["map"], "precision_at_10": r.metrics["precision_at_10"],
          "recall_at_1": r.metrics["recall_at_1"], "recall_at_10": r.metrics["recall_at_10"],
          "run": f"`{r.run_id[:8]}`"} for r in exact],
        ["dataset", "protocol", "queries", "database", "map", "precision_at_10", "recall_at_1",
         "recall_at_10", "run"],
        {"map": ".3f", "precision_at_10": ".3f", "recall_at_1": ".3f", "recall_at_10": ".3f"},
        {"map": "mAP", "precision_at_10": "P@10", "recall_at_1": "R@1", "recall_at_10": "R@10"},
    )  # fmt: skip
    block = f"{README_BEGIN}\n{table}\n{README_END}"
    pattern = re.escape(README_BEGIN) + ".*?" + re.escape(README_END)
    path.write_text(re.sub(pattern, lambda _: block, text, flags=re.S))


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="latest", help="reports/NAME/ is written")
    p.add_argument("--out", default=str(REPO / "reports"))
    p.add_argument("--sweep", action="append", help="a multirun's MLflow parent run id")
    p.add_argument("--filter", default="", help="an MLflow search filter, e.g. "
                   "\"params.`dataset.name` = 'corel1k'\"")  # fmt: skip
    p.add_argument("--prefix", default="visual-search-", help="experiment name prefix")
    p.add_argument(
        "--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
    )
    p.add_argument("--readme", help="rewrite this README's results block from the same runs")
    p.add_argument("--no-images", action="store_true",
                   help="leave out the figures that read images (examples, Grad-CAM)")  # fmt: skip
    return p.parse_args()


if __name__ == "__main__":
    main()
