"""Load on the running web app: concurrent API searches, then Grad-CAM explanations.

Starts `python -m visual_search.app serve` (waitress) on a free local port with a throw-away
instance folder and API token, waits for /health, then:

- search: `--clients` threads each send `--requests` POST /api/search with real Corel-1k
  images (k=10), and the latency of every request is recorded;
- explain: one client, then `--clients` clients, POST /api/explain for (query, top result)
  pairs: one Grad-CAM pair (the query's map and the result's) per request.

The baseline is the same search called in this process (`Searcher.query`, no HTTP), so the
ratio shows what the server adds. The served run is chosen as `make serve` chooses it
(configs/serve.yaml); pass serve settings after `--`, e.g. `-- run_id=abc123`.

    python experiments/benchmark_serve.py [--clients 4] [--requests 200] [-- KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from visual_search import serving, timing
from visual_search.app.__main__ import load_settings
from visual_search.app.users import UserStore
from visual_search.images import load_rgb


def main() -> None:
    args = _parse()
    cfg = load_settings(args.overrides)
    uri = serving.store_uri(cfg.tracking_uri)
    choice = serving.choose_run(uri, cfg.run_id, cfg.metric, cfg.dataset_name, cfg.max_latency_ms,
                                cfg.latency_metric, cfg.experiment_prefix)  # fmt: skip
    run_cfg = serving.run_config(uri, choice, cfg.paths)
    searcher = serving.Searcher.build(run_cfg, choice.search)
    files = [searcher.image_path(i) for i in searcher.owner[:: max(1, len(searcher.owner) // 50)]]
    payloads = [f.read_bytes() for f in files]

    # Baseline in this process: decode + embed + search, no HTTP.
    searcher.query(load_rgb(files[0]), 10)  # warm-up
    baseline = []
    for path in files * 2:
        start = time.perf_counter()
        searcher.query(load_rgb(path), 10)
        baseline.append(time.perf_counter() - start)
    del searcher  # free its threads and memory before the server starts

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as instance:
        store = UserStore(Path(instance) / "users.json")
        store.add("bench", "bench-password")
        token = store.new_token("bench")
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "visual_search.app", "serve", f"port={port}",
             f"instance={instance}", f"run_id={choice.run_id}", *args.overrides],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_for(url, server)
            headers = {"Authorization": f"Bearer {token}"}
            search, search_errors, search_s = _load(
                url + "/api/search", headers, payloads, args.clients, args.requests, {"k": "10"}
            )
            top = requests.post(url + "/api/search", headers=headers, timeout=60,
                                files={"image": payloads[0]}, data={"k": "1"}).json()  # fmt: skip
            item = {"item": str(top["results"][0]["item"])}
            explain_one, errors_one, _ = _load(
                url + "/api/explain", headers, payloads, 1, args.explain_requests, item
            )
            explain_many, errors_many, _ = _load(
                url + "/api/explain", headers, payloads, args.clients, args.explain_requests, item
            )
        finally:
            server.terminate()
            server.wait(timeout=30)

    n = args.clients * args.requests
    print(f"run {choice.run_id} ({choice.experiment}; {choice.rule}); cores={os.cpu_count()} "
          f"cpu={timing.cpu_model()}; waitress threads={cfg.threads}")  # fmt: skip
    print(f"{'':<36}{'n':>6}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}")
    rows = [
        ("in-process search (baseline)", baseline, 0),
        (f"search, {args.clients} clients", search, search_errors),
        ("explain pair, 1 client", explain_one, errors_one),
        (f"explain pair, {args.clients} clients", explain_many, errors_many),
    ]
    for name, seconds, errors in rows:
        print(f"{name:<36}{len(seconds):>6}{errors:>8}{_ms(seconds, 50):>9.1f}"
              f"{_ms(seconds, 95):>9.1f}")  # fmt: skip
    print(f"search throughput {n / search_s:.1f} requests/s; server p50 / in-process p50 = "
          f"{_ms(search, 50) / _ms(baseline, 50):.2f}x")  # fmt: skip


def _load(url, headers, payloads, clients, per_client, form):
    """Each client sends `per_client` requests in turn; returns latencies, errors, wall s."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(offset: int) -> None:
        session = requests.Session()
        for i in range(per_client):
            data = payloads[(offset * 7 + i) % len(payloads)]
            start = time.perf_counter()
            try:
                reply = session.post(url, headers=headers, files={"image": data}, data=form,
                                     timeout=120)  # fmt: skip
                ok = reply.status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - start


def _ms(seconds: list[float], q: int) -> float:
    if not seconds:
        return float("nan")
    return 1000 * statistics.quantiles(seconds, n=100, method="inclusive")[q - 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, limit_s: float = 600) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}):\n{server.stderr.read()}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health within {limit_s} s")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=200, help="searches per client")
    p.add_argument("--explain-requests", type=int, default=10, help="explanations per client")
    p.add_argument("overrides", nargs="*", help="configs/serve.yaml settings, after --")
    return p.parse_args()


if __name__ == "__main__":
    main()
