"""Load on the online teacher endpoint: throughput and latency, with and without dynamic batching,
and overload behaviour (503s, no crash, memory bounded).

Runs `distill serve` (uvicorn) in a subprocess on 127.0.0.1 with a random-init teacher
(default ``gfl_r18`` at a 128x128 canvas, the quick preset's teacher) and drives it from
asyncio httpx clients in this process. Each client sends one-view requests back to back.

    python benchmarks/serve_load.py                  # the figures of benchmarks/RESULTS.md
    python benchmarks/serve_load.py --views 24 --clients 1,4   # quicker

Bounded: every phase sends a fixed number of requests; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from detcore.views import plan_views  # noqa: E402
from label_store.wire import unpack_targets  # noqa: E402
from teacher_service.api.testing import (  # noqa: E402
    ServerProcess,
    encode_image,
    make_tiny_teacher,
    random_image,
    targets_request,
)


def metric(text: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def make_requests(canvas: int, count: int) -> list[tuple[dict, list]]:
    """``count`` one-view requests over 8 distinct images (sizes around the canvas)."""
    out = []
    images = {}
    for i in range(8):
        h, w = int(canvas * (0.6 + 0.05 * i)), int(canvas * (0.9 - 0.04 * i))
        images[i] = (h, w, encode_image(random_image(h, w, seed=i)))
    views = plan_views([(i, h, w) for i, (h, w, _) in images.items()], canvas_hw=(canvas, canvas))
    for k in range(count):
        view = views[k % len(views)]
        out.append(targets_request([view], [images[view.image_id][2]]))
    return out


async def run_clients(url: str, headers: dict, requests: list, num_clients: int) -> dict:
    """``num_clients`` concurrent clients share ``requests``; each sends its share back to back."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    queue = list(enumerate(requests))
    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while queue:
                _, (data, files) = queue.pop()
                started = time.perf_counter()
                response = await client.post("/v1/targets", data=data, files=files)
                latencies.append(time.perf_counter() - started)
                codes[response.status_code] = codes.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    unpack_targets(response.content)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(num_clients)))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "latencies": latencies, "codes": codes}


def load_phase(teacher: Path, canvas: int, batches: list[int], clients: list[int], views: int, threads: int,
               repeats: int) -> list[dict]:
    """One server per max_batch, all up at once; runs alternate between them (A/B/A/B) so that
    the other jobs of a shared machine weigh on every configuration alike."""
    servers = {}
    try:
        for max_batch in batches:
            options = ["--max-batch", str(max_batch), "--max-wait-ms", "10", "--max-queue", "256",
                       "--torch-threads", str(threads)]
            servers[max_batch] = ServerProcess(teacher, options=options, env={"OMP_NUM_THREADS": str(threads)}).start()
            asyncio.run(run_clients(servers[max_batch].url, servers[max_batch].headers, make_requests(canvas, 4), 2))
        rows = []
        for num_clients in clients:
            runs: dict[int, list[dict]] = {b: [] for b in batches}
            for _ in range(repeats):
                for max_batch, server in servers.items():
                    before = httpx.get(server.url + "/metrics").text
                    result = asyncio.run(run_clients(server.url, server.headers, make_requests(canvas, views), num_clients))
                    after = httpx.get(server.url + "/metrics").text
                    result["batches"] = metric(after, "distillery_batch_size_count") - metric(before, "distillery_batch_size_count")
                    result["batched"] = metric(after, "distillery_batch_size_sum") - metric(before, "distillery_batch_size_sum")
                    result["load"] = os.getloadavg()[0]
                    runs[max_batch].append(result)
            for max_batch, results in runs.items():
                latencies = [x for r in results for x in r["latencies"]]
                ok = [r["codes"].get(200, 0) for r in results]
                row = {
                    "max_batch": max_batch,
                    "clients": num_clients,
                    "requests": sum(len(r["latencies"]) for r in results),
                    "ok": sum(ok),
                    "views_per_s_runs": [n / r["wall_s"] for n, r in zip(ok, results)],
                    "views_per_s": statistics.median(n / r["wall_s"] for n, r in zip(ok, results)),
                    "p50_ms": 1000 * percentile(latencies, 50),
                    "p99_ms": 1000 * percentile(latencies, 99),
                    "mean_batch": sum(r["batched"] for r in results) / max(1, sum(r["batches"] for r in results)),
                    "load": statistics.mean(r["load"] for r in results),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        for server in servers.values():
            assert server.alive(), server.log()
        return rows
    finally:
        for server in servers.values():
            server.stop()


def overload_phase(teacher: Path, canvas: int, threads: int, clients: int, rounds: int) -> dict:
    options = ["--max-batch", "8", "--max-wait-ms", "10", "--max-queue", "8", "--torch-threads", str(threads)]
    with ServerProcess(teacher, options=options, env={"OMP_NUM_THREADS": str(threads)}) as server:
        asyncio.run(run_clients(server.url, server.headers, make_requests(canvas, 4), 2))
        rss_start = server.rss_bytes()
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    samples.append(server.rss_bytes())
                except OSError:
                    break
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        per_round = []
        for _ in range(rounds):
            result = asyncio.run(run_clients(server.url, server.headers, make_requests(canvas, clients), clients))
            per_round.append({"codes": result["codes"], "rss_mb": server.rss_bytes() / 2**20,
                              "wall_s": result["wall_s"]})
            print(json.dumps(per_round[-1]), flush=True)
        stop.set()
        sampler.join()
        ready = httpx.get(server.url + "/readyz").status_code
        data, files = make_requests(canvas, 1)[0]
        valid_after = httpx.post(server.url + "/v1/targets", headers=server.headers, data=data, files=files,
                                 timeout=600)
        metrics = httpx.get(server.url + "/metrics").text
        return {
            "clients": clients,
            "rounds": per_round,
            "rss_start_mb": rss_start / 2**20,
            "rss_peak_mb": max(samples) / 2**20 if samples else float("nan"),
            "rss_end_mb": server.rss_bytes() / 2**20,
            "ready_after": ready,
            "valid_after": valid_after.status_code,
            "alive": server.alive(),
            "errors_total": metric(metrics, "distillery_errors_total"),
            "queue_depth_after": metric(metrics, "distillery_queue_depth"),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="gfl_r18", help="teacher architecture (random init)")
    parser.add_argument("--canvas", type=int, default=128, help="square canvas side")
    parser.add_argument("--clients", default="1,4,16", help="client counts")
    parser.add_argument("--batches", default="1,8", help="max_batch values (1 = no dynamic batching)")
    parser.add_argument("--views", type=int, default=32, help="one-view requests per run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per configuration")
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--overload-rounds", type=int, default=3)
    parser.add_argument("--json", help="write all rows to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        teacher = make_tiny_teacher(Path(tmp) / "teacher.pt", arch=args.arch, num_classes=12,
                                    canvas_hw=(args.canvas, args.canvas))
        print(f"# {args.arch} at {args.canvas}x{args.canvas}, load average {os.getloadavg()[0]:.2f}", flush=True)
        rows = load_phase(teacher, args.canvas, [int(b) for b in args.batches.split(",")],
                          [int(c) for c in args.clients.split(",")], args.views, args.threads, args.repeats)
        overload = overload_phase(teacher, args.canvas, args.threads, args.overload_clients, args.overload_rounds)
        print(json.dumps(overload), flush=True)

    print("\n| clients | max_batch | requests (ok) | views/s, median (runs) | p50 ms | p99 ms | mean batch | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["clients"], r["max_batch"])):
        runs = ", ".join(f"{v:.2f}" for v in r["views_per_s_runs"])
        print(f"| {r['clients']} | {r['max_batch']} | {r['requests']} ({r['ok']}) | {r['views_per_s']:.2f} ({runs}) | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.2f} | {r['load']:.1f} |")
    print(f"\noverload ({overload['clients']} clients x {len(overload['rounds'])} rounds, max_queue 8):")
    for i, r in enumerate(overload["rounds"]):
        print(f"  round {i + 1}: {r['codes']} in {r['wall_s']:.1f} s, RSS {r['rss_mb']:.0f} MB")
    print(f"  RSS start {overload['rss_start_mb']:.0f} MB, peak {overload['rss_peak_mb']:.0f} MB, "
          f"end {overload['rss_end_mb']:.0f} MB; /readyz after: {overload['ready_after']}; "
          f"valid request after: {overload['valid_after']}; alive: {overload['alive']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "overload": overload}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
