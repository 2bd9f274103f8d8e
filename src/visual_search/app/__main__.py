"""Command line of the web app.

    python -m visual_search.app serve [KEY=VALUE ...]     # configs/serve.yaml keys
    python -m visual_search.app users add NAME            # asks for the password
    python -m visual_search.app users token NAME          # prints a new API token once
    python -m visual_search.app users list | remove NAME

Users live in the instance folder (`instance`, or VISUAL_SEARCH_INSTANCE).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import re
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from visual_search.app.users import UserError, UserStore

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
log = logging.getLogger("visual_search.app")


class SettingsError(ValueError):
    """A serve setting that cannot work; the message names it."""


METHODS = ("gradcam", "gradcam++", "eigencam")
METRIC_NAME = re.compile(r"[A-Za-z0-9_.@]+")


def load_settings(overrides: list[str]) -> DictConfig:
    """configs/serve.yaml with `overrides`, checked before anything is loaded."""
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("serve", overrides=overrides)
    except HydraException as err:
        raise SettingsError(f"{err} (the settings are the keys of configs/serve.yaml)") from err
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def whole(name: str, low: int, high: int | None = None) -> None:
        value = cfg[name]
        fits = isinstance(value, int) and not isinstance(value, bool) and low <= value
        need(fits and (high is None or value <= high),
             f"{name} must be a whole number from {low}" + (f" to {high}" if high else "")
             + f", got {value!r}")  # fmt: skip

    whole("port", 1, 65535)
    whole("threads", 1)
    whole("max_k", 1)
    whole("max_pixels", 1)
    whole("k", 1, cfg.max_k if isinstance(cfg.max_k, int) else 1)
    need(isinstance(cfg.max_upload_mb, int | float) and cfg.max_upload_mb > 0,
         f"max_upload_mb must be positive, got {cfg.max_upload_mb!r}")  # fmt: skip
    need(
        cfg.explain_method in METHODS,
        f"explain_method must be one of {', '.join(METHODS)}, got {cfg.explain_method!r}",
    )
    for name in ("metric", "latency_metric"):
        need(
            isinstance(cfg[name], str) and bool(METRIC_NAME.fullmatch(cfg[name])),
            f"{name} must be an MLflow metric name such as map, got {cfg[name]!r}",
        )
    need(
        cfg.max_latency_ms is None or isinstance(cfg.max_latency_ms, int | float),
        f"max_latency_ms must be a number or null, got {cfg.max_latency_ms!r}",
    )
    need(bool(str(cfg.host).strip()), "host must not be empty")
    if problems:
        raise SettingsError("; ".join(problems))
    return cfg


def build(cfg: DictConfig):
    """Choose the run, rebuild its searcher, detector and explainer; return the app."""
    from visual_search import serving
    from visual_search.app import Settings, create_app
    from visual_search.explain import Explainer

    uri = serving.store_uri(cfg.tracking_uri)
    choice = serving.choose_run(
        uri, cfg.run_id, cfg.metric, cfg.dataset_name, cfg.max_latency_ms, cfg.latency_metric,
        cfg.experiment_prefix,
    )  # fmt: skip
    log.info(
        "serving run %s (%s; %s): %s",
        choice.run_id,
        choice.experiment,
        choice.rule,
        {k: round(v, 4) for k, v in choice.metrics.items() if k in ("map", "recall_at_1")},
    )
    run_cfg = serving.run_config(uri, choice, cfg.paths)
    searcher = serving.Searcher.build(run_cfg, choice.search)
    detector = serving.detector_for(run_cfg, cfg.detector)
    explainer = Explainer(searcher.embedder, cfg.explain_method, cfg.explain_target_layer)
    settings = Settings(
        instance=Path(cfg.instance), max_upload_mb=cfg.max_upload_mb, k=cfg.k, max_k=cfg.max_k,
        max_pixels=cfg.max_pixels, explain_method=cfg.explain_method, run_id=choice.run_id,
    )  # fmt: skip
    return create_app(settings, searcher, detector, explainer)


def serve(overrides: list[str]) -> None:
    from waitress import serve as waitress_serve

    cfg = load_settings(overrides)
    app = build(cfg)
    if not UserStore(Path(app.instance_path) / "users.json").names():
        log.warning("no users yet: python -m visual_search.app users add NAME")
    log.info("listening on http://%s:%d", cfg.host, cfg.port)
    waitress_serve(app, host=cfg.host, port=cfg.port, threads=cfg.threads, ident="visual-search")


def users(args: argparse.Namespace) -> None:
    cfg = load_settings([])
    instance = Path(args.instance or cfg.instance).expanduser()
    store = UserStore(instance / "users.json")
    if args.action == "list":
        print("\n".join(store.names()))
    elif args.action == "add":
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else (
            getpass.getpass(f"password for {args.name}: ")
        )  # fmt: skip
        store.add(args.name, password)
        print(f"user {args.name} added to {store.path}")
    elif args.action == "token":
        print(store.new_token(args.name))
    elif args.action == "remove":
        store.remove(args.name)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
    )
    p = argparse.ArgumentParser(
        prog="python -m visual_search.app", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the chosen run with waitress")
    s.add_argument("overrides", nargs="*", help="configs/serve.yaml settings as KEY=VALUE")
    u = sub.add_parser("users", help="manage users")
    u.add_argument("action", choices=["add", "token", "list", "remove"])
    u.add_argument("name", nargs="?")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u.add_argument("--instance", help="instance folder (default: the serve config's)")
    args = p.parse_args(argv)
    try:
        if args.command == "serve":
            serve(args.overrides)
        else:
            if args.action != "list" and not args.name:
                p.error(f"users {args.action} needs a NAME")
            users(args)
    except (UserError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
