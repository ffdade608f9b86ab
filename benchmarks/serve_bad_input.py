"""Bad input against the online teacher endpoint: malformed and hostile requests of every kind
mixed with valid ones, sent concurrently. Every valid request must be answered correctly
(targets equal to the teacher's forward pass run here), every bad one with its 4xx (or, for
aborted uploads, counted as a client disconnect), no error answer may be large, no answer
or log line may hold a token sent by a client, and the server must be healthy at the end.
Hostile kinds: decompression-bomb PNGs (20 KB, 13000x13000 and 8000x8000 pixels), JSON nested
10,000 deep, a 5,000-digit integer, 200,000 unknown target names, oversized fields and
image files, tokens without scheme / after a tab / in the query string, uploads aborted
mid-body, bodies shorter than their Content-Length, HEAD probes. The server's RSS is read
before, at its peak (VmHWM) and after; a prober measures /healthz latency during the run.

    python benchmarks/serve_bad_input.py               # the figures of benchmarks/RESULTS.md
    python benchmarks/serve_bad_input.py --repeat 1    # one of each kind

The server stores fp32 targets here (``--codec cls=fp32 ...``) so that "correct" is a tight
numeric comparison (batch composition moves float32 results by ~1e-6). Bounded: a fixed
list of requests; loopback only. Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from detcore.views import plan_views, render_array  # noqa: E402
from label_store.wire import unpack_targets  # noqa: E402
from teacher_service.api.testing import (  # noqa: E402
    TEST_TOKEN,
    ServerProcess,
    bomb_png,
    encode_image,
    make_tiny_teacher,
    random_image,
)

CANVAS = 64
MAX_QUEUE = 16
MAX_REQUEST_BYTES = 1 << 20
MAX_FIELD_BYTES = 512 * 1024
MAX_IMAGE_BYTES = 512 * 1024
BODY_TIMEOUT_S = 2.0
SECRET = "client-secret-" + "z" * 20  # what a careless client sends; must never come back or be logged
MAX_ERROR_ANSWER_BYTES = 16 * 1024
IMAGES = {1: (40, 50), 2: (64, 30), 3: (48, 48), 4: (20, 64)}


def build_cases(pixels: dict, views: list) -> list[dict]:
    """Every malformed kind once, as request specs: method, path, headers, data/files/content."""
    png = {i: encode_image(p) for i, p in pixels.items()}
    by_image = defaultdict(list)
    for v in views:
        by_image[v.image_id].append(v)
    v1 = by_image[1][0]
    row = v1.to_dict()

    def multipart(rows, images, targets=None, views_text=None):
        data = {"views": views_text if views_text is not None else json.dumps(rows)}
        if targets is not None:
            data["targets"] = targets
        return {"data": data, "files": [("images", (f"{i}.png", b, "application/octet-stream")) for i, b in enumerate(images)]}

    good = multipart([row], [png[1]])
    auth = {"Authorization": f"Bearer {TEST_TOKEN}"}
    bomb = {"13k": bomb_png(13000, 13000), "8k": bomb_png(8000, 8000)}
    bomb_rows = {name: plan_views([(90 + i, side, side)], canvas_hw=(CANVAS, CANVAS))[0].to_dict()
                 for i, (name, side) in enumerate((("13k", 13000), ("8k", 8000)))}

    def upload_head(length: int) -> bytes:
        return (f"POST /v1/targets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_TOKEN}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n").encode()
    jpeg_garbage = b"\xff\xd8\xff\xe0" + bytes(random.Random(0).getrandbits(8) for _ in range(2000))
    cases = [
        ("no-token", 401, {"headers": {}, **good}),
        ("wrong-token", 401, {"headers": {"Authorization": "Bearer wrong-token-0123456789"}, **good}),
        ("basic-scheme", 401, {"headers": {"Authorization": f"Basic {TEST_TOKEN}"}, **good}),
        ("json-body", 415, {"json": {"views": [row]}}),
        ("urlencoded-body", 415, {"data": {"views": json.dumps([row])}}),
        ("broken-multipart", 400, {"content": b"--b\r\nContent-Disposition: form-data\r\n\r\nno end",
                                   "headers": {**auth, "Content-Type": "multipart/form-data; boundary=b"}}),
        ("missing-views", 422, {"files": [("images", ("a.png", png[1], "image/png"))]}),
        ("views-not-json", 422, multipart(None, [png[1]], views_text="[{'image_id': 1}")),
        ("views-not-a-list", 422, multipart(None, [png[1]], views_text="42")),
        ("view-not-an-object", 422, multipart([7], [png[1]])),
        ("view-missing-field", 422, multipart([{k: v for k, v in row.items() if k != "flip"}], [png[1]])),
        ("view-bad-type", 422, multipart([dict(row, scale="abc")], [png[1]])),
        ("view-flip-as-text", 422, multipart([dict(row, flip="false")], [png[1]])),
        ("view-fractional-size", 422, multipart([dict(row, image_h=40.5)], [png[1]])),
        ("view-unknown-field", 422, multipart([dict(row, rotate=90)], [png[1]])),
        ("view-nan-scale", 422, multipart(None, [png[1]], views_text=json.dumps([dict(row, scale=0.5)]).replace("0.5", "NaN"))),
        ("view-negative-offset", 422, multipart([dict(row, offset_x=-3)], [png[1]])),
        ("view-off-canvas", 422, multipart([dict(row, scale=4.0)], [png[1]])),
        ("view-wrong-canvas", 422, multipart([dict(row, canvas_h=128, canvas_w=128)], [png[1]])),
        ("image-count-mismatch", 422, multipart([row, row], [png[1]])),
        ("images-as-text", 422, {"data": {"views": json.dumps([row]), "images": "not a file"},
                                 "files": [("other", ("x", b"x", "text/plain"))]}),
        ("empty-image", 422, multipart([row], [b""])),
        ("not-an-image", 422, multipart([row], [b"GIF? no, plain text"])),
        ("truncated-png", 422, multipart([row], [png[1][: len(png[1]) // 2]])),
        ("garbage-jpeg", 422, multipart([row], [jpeg_garbage])),
        ("wrong-image-size", 422, multipart([row], [png[2]])),
        ("unknown-target", 422, multipart([row], [png[1]], targets="cls,logits")),
        ("empty-target-list", 422, multipart([row], [png[1]], targets=",,")),
        ("too-many-views", 413, multipart([row] * (MAX_QUEUE + 1), [png[1]] * (MAX_QUEUE + 1))),
        ("body-too-large", 413, multipart([row], [b"\0" * (MAX_REQUEST_BYTES + 10)])),
        ("chunked-too-large", 413, {"chunked": multipart([row], [b"\0" * (MAX_REQUEST_BYTES + 10)])}),
        ("unknown-route", 404, {"path": "/v1/nothing"}),
        ("wrong-method", 405, {"method": "GET"}),
        ("raw-garbage", 400, {"raw": b"THIS IS NOT HTTP\r\n\r\n"}),
        # hostile kinds
        ("bomb-13k-for-small-view", 422, multipart([row], [bomb["13k"]])),
        ("bomb-13k-for-its-size", 422, multipart([bomb_rows["13k"]], [bomb["13k"]])),
        ("bomb-8k-for-its-size", 422, multipart([bomb_rows["8k"]], [bomb["8k"]])),
        ("views-nested-10000", 422, multipart(None, [png[1]], views_text="[" * 10_000 + "]" * 10_000)),
        ("views-5000-digit-int", 422, multipart(None, [png[1]], views_text=json.dumps([row]).replace(
            f'"image_id": {row["image_id"]}', '"image_id": ' + "7" * 5000))),
        ("targets-200k-unknown", 422, multipart([row], [png[1]], targets=",".join(["x"] * 200_000))),
        ("views-field-too-large", 413, multipart([row] * 3500, [png[1]])),
        ("image-file-too-large", 413, multipart([row], [b"\x89PNG" + b"\0" * (MAX_IMAGE_BYTES + 10)])),
        ("token-without-scheme", 401, {"headers": {"Authorization": SECRET}, **good}),
        ("token-after-tab-wrong", 401, {"headers": {"Authorization": f"Bearer\t{SECRET}"}, **good}),
        ("token-in-query", 401, {"headers": {}, "path": f"/v1/teacher?token={SECRET}", "method": "GET"}),
        ("aborted-upload", 0, {"abort": upload_head(1 << 19) + b"--b\r\nContent-Disposition: form-data; "
                                         b'name="images"; filename="a.png"\r\n\r\n' + b"\0" * 4096}),
        ("body-shorter-than-length", 408, {"raw": upload_head(5000) + b"--b\r\n"}),
        ("head-healthz", 200, {"method": "HEAD", "path": "/healthz", "headers": {}}),
        ("head-readyz", 200, {"method": "HEAD", "path": "/readyz", "headers": {}}),
    ]
    out = []
    for name, status, spec in cases:
        spec.setdefault("headers", auth)
        out.append({"name": name, "expect": status, **spec})
    return out


def valid_cases(pixels: dict, views: list, count: int, rng: random.Random) -> list[dict]:
    png = {i: encode_image(p) for i, p in pixels.items()}
    out = []
    for _ in range(count):
        chosen = rng.sample(views, rng.choice([1, 2]))
        data = {"views": json.dumps([v.to_dict() for v in chosen])}
        files = [("images", (f"{i}.png", png[v.image_id], "application/octet-stream")) for i, v in enumerate(chosen)]
        out.append({"name": "valid", "expect": 200, "views": chosen, "data": data, "files": files,
                    "headers": {"Authorization": f"Bearer {TEST_TOKEN}"}})
    return out


def raw_request(port: int, payload: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        reply = sock.recv(4096).decode(errors="replace")
    try:
        return int(reply.split(" ", 2)[1])
    except (IndexError, ValueError):
        return -1


def aborted_upload(port: int, payload: bytes) -> int:
    """Send the head and part of a body, then close the connection: 0 (no answer expected)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
    return 0


async def send(client: httpx.AsyncClient, port: int, case: dict) -> tuple[int, httpx.Response | None]:
    if "raw" in case:
        return await asyncio.to_thread(raw_request, port, case["raw"]), None
    if "abort" in case:
        return await asyncio.to_thread(aborted_upload, port, case["abort"]), None
    method = case.get("method", "POST")
    path = case.get("path", "/v1/targets")
    if "chunked" in case:
        request = client.build_request("POST", path, data=case["chunked"]["data"], files=case["chunked"]["files"])
        body = request.read()

        async def chunks():
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        response = await client.post(path, content=chunks(), headers={**case["headers"],
                                     "Content-Type": request.headers["Content-Type"]})
        return response.status_code, response
    kwargs = {k: case[k] for k in ("data", "files", "json", "content") if k in case}
    response = await client.request(method, path, headers=case["headers"], **kwargs)
    return response.status_code, response


def direct_targets(teacher_path: Path, pixels: dict, views: list) -> dict:
    """The teacher's own forward pass of every view (float32, one thread)."""
    from detcore.checkpoint import load_detector

    torch.set_num_threads(1)
    model = load_detector(teacher_path, map_location="cpu")
    model.eval()
    out = {}
    with torch.inference_mode():
        for view in views:
            canvas = torch.from_numpy(render_array(pixels[view.image_id], view))[None]
            targets = model(canvas).to_targets(("cls", "box", "fpn"))
            out[view.key] = {name: t[0].numpy() for name, t in targets.items()}
    return out


async def run(server: ServerProcess, cases: list[dict], concurrency: int):
    """Send every case from ``concurrency`` clients; meanwhile probe /healthz every 50 ms.

    Returns ``(results, healthz_latencies_s, peak_rss_bytes)``."""
    results = []
    pending = list(cases)
    latencies: list[float] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

        async def worker():
            while pending:
                case = pending.pop()
                status, response = await send(client, server.port, case)
                results.append((case, status, response))

        async def prober():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as probe:
                while not done.is_set():
                    started = time.perf_counter()
                    await probe.get("/healthz")
                    latencies.append(time.perf_counter() - started)
                    try:
                        await asyncio.wait_for(done.wait(), timeout=0.05)
                    except TimeoutError:
                        pass

        probe_task = asyncio.create_task(prober())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        done.set()
        await probe_task
    return results, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="copies of every malformed kind")
    parser.add_argument("--valid", type=int, default=120, help="valid requests mixed in")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    pixels = {i: random_image(h, w, seed=i) for i, (h, w) in IMAGES.items()}
    views = plan_views([(i, h, w) for i, (h, w) in IMAGES.items()], canvas_hw=(CANVAS, CANVAS), scales=(1.0, 0.6))
    with tempfile.TemporaryDirectory(prefix="serve-bad-") as tmp:
        teacher = make_tiny_teacher(Path(tmp) / "teacher.pt", canvas_hw=(CANVAS, CANVAS))
        reference = direct_targets(teacher, pixels, views)
        bad = [dict(c) for c in build_cases(pixels, views) for _ in range(args.repeat)]
        cases = bad + valid_cases(pixels, views, args.valid, rng)
        rng.shuffle(cases)
        options = ["--max-batch", "8", "--max-wait-ms", "5", "--max-queue", str(MAX_QUEUE),
                   "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-field-bytes", str(MAX_FIELD_BYTES),
                   "--max-image-bytes", str(MAX_IMAGE_BYTES), "--body-timeout-s", str(BODY_TIMEOUT_S),
                   "--torch-threads", "1", "--codec", "cls=fp32", "--codec", "box=fp32", "--codec", "fpn=fp32"]
        with ServerProcess(teacher, options=options) as server:
            warm = valid_cases(pixels, views, 2, random.Random(1))
            asyncio.run(run(server, warm, 1))  # first-request allocations are not the bad input's
            rss_start, peak_start = server.rss_bytes(), server.peak_rss_bytes()
            started = time.perf_counter()
            results, latencies = asyncio.run(run(server, cases, args.concurrency))
            wall = time.perf_counter() - started
            peak = server.peak_rss_bytes()
            ready = httpx.get(server.url + "/readyz").status_code
            final = httpx.post(server.url + "/v1/targets", headers={"Authorization": f"Bearer {TEST_TOKEN}"},
                               data={"views": json.dumps([views[0].to_dict()])},
                               files=[("images", ("a.png", encode_image(pixels[views[0].image_id]), "image/png"))])
            metrics = httpx.get(server.url + "/metrics").text
            alive, rss_end = server.alive(), server.rss_bytes()
            log = server.log_path.read_text(errors="replace")

    failures = []
    by_kind: dict[str, Counter] = defaultdict(Counter)
    answer_bytes: dict[str, int] = defaultdict(int)
    max_error = 0.0
    for case, status, response in results:
        by_kind[case["name"]][status] += 1
        if response is not None:
            answer_bytes[case["name"]] = max(answer_bytes[case["name"]], len(response.content))
        if case["name"] == "valid":
            if status != 200:
                failures.append(f"valid request answered {status}: {response.text[:200] if response else ''}")
                continue
            _, _, entries = unpack_targets(response.content)
            if [(e["image_id"], e["view_id"]) for e in entries] != [v.key for v in case["views"]]:
                failures.append("valid request answered for other views")
                continue
            for entry in entries:
                expected = reference[(entry["image_id"], entry["view_id"])]
                for name, array in entry["targets"].items():
                    err = float(np.abs(array - expected[name]).max())
                    max_error = max(max_error, err)
                    if not np.allclose(array, expected[name], rtol=1e-4, atol=1e-4):
                        failures.append(f"{name} of {entry['image_id'], entry['view_id']} differs by {err}")
        else:
            if status != case["expect"]:
                failures.append(f"{case['name']}: expected {case['expect']}, got {status}")
            elif response is not None and status >= 400:
                doc = response.json()
                if not {"type", "title", "status", "detail", "errors"} <= set(doc) or doc["status"] != status:
                    failures.append(f"{case['name']}: not a problem document: {doc}")
                if len(response.content) > MAX_ERROR_ANSWER_BYTES:
                    failures.append(f"{case['name']}: error answer of {len(response.content)} bytes")
                if SECRET in response.text:
                    failures.append(f"{case['name']}: the client's token came back in the answer")
    healthy = ready == 200 and final.status_code == 200 and alive
    if not healthy:
        failures.append(f"server not healthy at the end: readyz {ready}, valid {final.status_code}, alive {alive}")
    if SECRET in log:
        failures.append("the client's token is in the server log")
    tracebacks = log.count("Traceback")
    if tracebacks:
        failures.append(f"{tracebacks} tracebacks in the server log")
    counters = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                if s.name in ("distillery_client_disconnects_total",)}
    aborted = sum(by_kind["aborted-upload"].values())
    if counters.get("distillery_client_disconnects_total", 0) != aborted:
        failures.append(f"client disconnects counted {counters.get('distillery_client_disconnects_total')}, "
                        f"sent {aborted}")

    print(f"{len(results)} requests ({sum(1 for c in cases if c['name'] == 'valid')} valid, {len(bad)} malformed "
          f"of {len(bad) // args.repeat} kinds) in {wall:.1f} s with {args.concurrency} concurrent clients")
    print("\n| kind | expected | answers | largest answer (bytes) |\n|---|---|---|---|")
    expected = {c["name"]: c["expect"] for c in cases}
    for name in sorted(by_kind, key=lambda n: (n != "valid", n)):
        answers = ", ".join(f"{code} x{count}" for code, count in sorted(by_kind[name].items()))
        print(f"| {name} | {expected[name]} | {answers} | {answer_bytes.get(name, '-')} |")
    print(f"\nvalid answers: max |endpoint - direct forward| = {max_error:.2e}")
    errors = {s.labels["kind"]: s.value for f in text_string_to_metric_families(metrics)
              for s in f.samples if s.name == "distillery_errors_total"}
    print(f"errors_total by kind: {json.dumps(errors, sort_keys=True)}")
    print(f"client_disconnects_total: {counters.get('distillery_client_disconnects_total', 0):.0f} "
          f"(aborted uploads sent: {aborted})")
    if latencies:
        print(f"/healthz during the run: {len(latencies)} probes, median {statistics.median(latencies) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms")
    print(f"largest error answer: {max((b for n, b in answer_bytes.items() if n != 'valid'), default=0)} bytes; "
          f"server log: {len(log.splitlines())} lines, {tracebacks} tracebacks")
    print(f"end: /readyz {ready}, valid request {final.status_code}, alive {alive}; server RSS before "
          f"{rss_start / 2**20:.0f} MB, peak during the run {peak / 2**20:.0f} MB (peak before {peak_start / 2**20:.0f} MB), "
          f"after {rss_end / 2**20:.0f} MB")
    if failures:
        print(f"\nFAILED ({len(failures)}):\n  " + "\n  ".join(failures[:30]))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
