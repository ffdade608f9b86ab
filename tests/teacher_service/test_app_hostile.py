"""The online endpoint under hostile input: each request below is the hostile request itself,
sent to the real application (in process with TestClient, or `distill serve` in a
subprocess on loopback where memory, logs, sockets or uvicorn's limits are the point).

1. decompression bombs are refused from the header, never decoded; decoding is bounded
2. pathological JSON (deep nesting, huge integers) is a 422, not a 500
3. error answers do not grow with the input
4. size limits per multipart field while reading; JSON parsed off the event loop
5. the Authorization header and query-string tokens are never echoed or logged
6. a client that goes away mid-upload is one INFO line and its own metric
7. a body that never arrives gets 408; beyond the connection limit, 503
8. HEAD on the probes; /docs, /openapi.json and /metrics behind settings
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from detcore.views import plan_views
from teacher_service.api.metrics import ServiceMetrics
from teacher_service.api.problems import MAX_LISTED_ERRORS, RequestProblem
from teacher_service.api.service import TargetService
from teacher_service.api.settings import ServeSettings
from teacher_service.api.testing import (
    TEST_TOKEN,
    ServerProcess,
    bomb_png,
    encode_image,
    make_tiny_teacher,
    random_image,
    targets_request,
)
from teacher_service.app import create_app, load_teacher

CANVAS = (64, 64)
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
BODY_TIMEOUT_S = 4.0
LIMIT_CONCURRENCY = 4


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("hostile") / "tiny.pt", canvas_hw=CANVAS)


@pytest.fixture(scope="module")
def loaded_teacher(teacher_path):
    return load_teacher(ServeSettings(teacher=teacher_path, auth_disabled=True, device="cpu"))


def _app(teacher_path, loaded_teacher, **overrides):
    values = {"teacher": teacher_path, "token": TEST_TOKEN, "device": "cpu", "max_wait_ms": 1, **overrides}
    return create_app(ServeSettings(**values), teacher_loader=lambda settings: loaded_teacher)


@pytest.fixture()
def client(teacher_path, loaded_teacher):
    with TestClient(_app(teacher_path, loaded_teacher, max_field_bytes=1 << 20, max_image_bytes=64 * 1024),
                    headers=AUTH) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def server(teacher_path):
    options = ["--max-batch", "4", "--max-wait-ms", "1", "--torch-threads", "1",
               "--body-timeout-s", str(BODY_TIMEOUT_S), "--limit-concurrency", str(LIMIT_CONCURRENCY)]
    with ServerProcess(teacher_path, options=options) as running:
        yield running
        assert running.alive(), running.log()


def _one_view(image_id=7, h=40, w=50):
    views = plan_views([(image_id, h, w)], canvas_hw=CANVAS)
    return views[0].to_dict(), encode_image(random_image(h, w, seed=image_id))


def _metric(text: str, name: str, labels: dict | None = None) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()))


def _post(client, rows_text: str, images, targets=None):
    data = {"views": rows_text}
    if targets is not None:
        data["targets"] = targets
    files = [("images", (f"{i}.png", blob, "application/octet-stream")) for i, blob in enumerate(images)]
    return client.post("/v1/targets", data=data, files=files)


def _raw_head(port: int, lines: list[str]) -> socket.socket:
    """A connection that has sent the request head ``lines`` (no body yet)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _upload_head(port: int, content_length: int, *, expect_continue: bool) -> socket.socket:
    lines = ["POST /v1/targets HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {TEST_TOKEN}",
             "Content-Type: multipart/form-data; boundary=b0undary", f"Content-Length: {content_length}"]
    if expect_continue:
        lines.append("Expect: 100-continue")
    sock = _raw_head(port, lines)
    if expect_continue:  # uvicorn says 100 Continue when the app starts reading the body
        assert b"100 Continue" in _read_until(sock, b"\r\n\r\n")
    return sock


# 1. images: header checked before decoding, decoding bounded ------------------------------
def test_bombs_are_refused_from_the_header_without_growing_the_server(server):
    """A 20 KB PNG of 13000x13000 pixels (Pillow warns, does not refuse) and one of 8000x8000
    (under Pillow's limit, over ours) are answered 422 naming the view, and the server's peak
    RSS does not move: neither was decoded (decoded, each would add 169-507 MB)."""
    bomb_13k, bomb_8k = bomb_png(13000, 13000), bomb_png(8000, 8000)
    assert len(bomb_13k) < 32 * 1024 and len(bomb_8k) < 32 * 1024
    row, image = _one_view(image_id=7)
    big_views = plan_views([(21, 13000, 13000), (22, 8000, 8000)], canvas_hw=CANVAS)
    big_13k = next(v for v in big_views if v.image_id == 21 and v.view_id == 0).to_dict()
    big_8k = next(v for v in big_views if v.image_id == 22 and v.view_id == 0).to_dict()
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as client:
        assert _post(client, json.dumps([row]), [image]).status_code == 200  # warm: first-request allocations
        peak_before, rss_before = server.peak_rss_bytes(), server.rss_bytes()
        cases = [
            ("13k bomb for a 40x50 view", [row, row], [image, bomb_13k], 1, 7),
            ("13k bomb for its own size", [row, big_13k], [image, bomb_13k], 1, 21),
            ("8k bomb for its own size", [big_8k], [bomb_8k], 0, 22),
            ("8k bomb for a 40x50 view", [row], [bomb_8k], 0, 7),
        ]
        kinds = {}
        for name, rows, images, index, image_id in cases:
            response = _post(client, json.dumps(rows), images)
            assert response.status_code == 422, (name, response.text)
            doc = response.json()
            kinds[name] = doc["type"].rsplit(":", 1)[1]
            assert doc["errors"][0]["index"] == index and doc["errors"][0]["image_id"] == image_id, (name, doc)
            assert f"view index {index}" in doc["detail"] and f"image_id={image_id}" in doc["detail"], doc
        # two bombs at once
        async def both():
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as aclient:
                return await asyncio.gather(*(_apost(aclient, [big_13k], [bomb_13k]) for _ in range(2)))

        assert [r.status_code for r in asyncio.run(both())] == [422, 422]
        peak_after, rss_after = server.peak_rss_bytes(), server.rss_bytes()
        assert client.get("/readyz").status_code == 200
    assert kinds["13k bomb for its own size"] == "invalid-image"  # Pillow's bomb warning, made an error
    assert kinds["8k bomb for its own size"] == "image-too-large"
    assert kinds["8k bomb for a 40x50 view"] in {"image-too-large", "image-size-mismatch"}
    assert peak_after - peak_before < 48 * 2**20, (peak_before, peak_after)
    assert rss_after - rss_before < 48 * 2**20, (rss_before, rss_after)


async def _apost(client, rows, images):
    data = {"views": json.dumps(rows)}
    files = [("images", (f"{i}.png", blob, "application/octet-stream")) for i, blob in enumerate(images)]
    return await client.post("/v1/targets", data=data, files=files)


def test_header_is_checked_before_any_pixel_is_decoded(client, monkeypatch):
    import detcore.images

    decoded = []
    real_decode = detcore.images._decode
    monkeypatch.setattr(detcore.images, "_decode", lambda *a: decoded.append(1) or real_decode(*a))
    row, image = _one_view(image_id=7)
    for rows, images in (([row], [bomb_png(5000, 5000)]), ([dict(row, image_h=41)], [image])):
        response = _post(client, json.dumps(rows), images)
        assert response.status_code == 422 and response.json()["type"].endswith("image-size-mismatch"), response.text
        assert "was not decoded" in response.json()["errors"][0]["detail"]
    assert decoded == []
    assert _post(client, json.dumps([row]), [image]).status_code == 200
    assert decoded == [1]


def test_decoding_runs_on_a_bounded_pool(teacher_path, loaded_teacher, monkeypatch):
    """Four requests at once with decode_workers=2: two decode, two wait their turn."""
    settings = ServeSettings(teacher=teacher_path, auth_disabled=True, device="cpu", decode_workers=2, max_wait_ms=0)
    release = threading.Event()
    entered = threading.Semaphore(0)
    real_prepare = loaded_teacher.prepare_view

    def blocking_prepare(*args, **kwargs):
        entered.release()
        assert release.wait(timeout=60)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(loaded_teacher, "prepare_view", blocking_prepare)
    row, image = _one_view()

    async def scenario():
        service = TargetService(loaded_teacher, settings, ServiceMetrics())
        service.start()
        try:
            tasks = [asyncio.create_task(service.compute([row], [image])) for _ in range(4)]
            for _ in range(2):
                assert await asyncio.to_thread(entered.acquire, True, 60)
            for _ in range(1000):  # yield until every request has handed its decoding to the pool
                if service.decode_pool.waiting == 2:
                    break
                await asyncio.sleep(0)
            assert (service.decode_pool.running, service.decode_pool.waiting) == (2, 2)
            release.set()
            bodies = await asyncio.gather(*tasks)
        finally:
            release.set()
            await service.close()
        return bodies

    assert len(asyncio.run(scenario())) == 4


# 2. pathological JSON ----------------------------------------------------------------------
def test_deeply_nested_views_and_huge_integers_are_422(client):
    row, image = _one_view()
    nested = "[" * 10_000 + "]" * 10_000
    digits = "9" * 5000
    for name, text in (("nested", nested), ("nested in a view", json.dumps([dict(row, image_id=0)]).replace(
            '"image_id": 0', '"image_id": ' + "[" * 10_000 + "]" * 10_000)), ("digits", json.dumps([row]).replace(
            f'"image_id": {row["image_id"]}', f'"image_id": {digits}'))):
        response = _post(client, text, [image])
        assert response.status_code == 422, (name, response.text)
        doc = response.json()
        assert doc["type"].endswith("invalid-request") and doc["errors"][0]["field"] == "views", doc
        assert len(response.content) < 2000 and digits[:100] not in response.text
    metrics = client.get("/metrics").text
    assert _metric(metrics, "distillery_errors_total", {"kind": "internal-error"}) == 0


# 3. answers never amplify ------------------------------------------------------------------
def test_error_answers_do_not_grow_with_the_input(client):
    row, image = _one_view()
    targets = ",".join("x" for _ in range(200_000))  # 400 KB, 200,000 unknown entries
    assert len(targets) < 1 << 20
    response = _post(client, json.dumps([row]), [image], targets=targets)
    assert response.status_code == 422, response.text[:300]
    doc = response.json()
    assert doc["type"].endswith("unknown-target")
    assert len(doc["errors"]) == MAX_LISTED_ERRORS and doc["num_errors"] == 200_000
    assert len(response.content) < 4096

    huge = "A" * 15_000  # 60 views of this kind stay under max_field_bytes
    bad_rows = [dict(row, image_id=huge), dict(row, **{f"k{i}": i for i in range(1000)}), dict(row, scale=[[huge]])]
    response = _post(client, json.dumps(bad_rows * 20), [image] * 60)
    assert response.status_code == 422
    doc = response.json()
    assert doc["type"].endswith("invalid-view") and doc["num_errors"] == 60 and len(doc["errors"]) == MAX_LISTED_ERRORS
    assert len(response.content) < 8192 and "A" * 100 not in response.text


# 4. per-field limits while reading; JSON off the event loop ----------------------------------
def test_field_limits_are_enforced_while_reading(client, monkeypatch):
    import teacher_service.api.service as service_module

    parsed = []
    monkeypatch.setattr(service_module, "parse_views", lambda raw: parsed.append(1))
    row, image = _one_view()
    views_text = json.dumps([row] * 10_000)  # ~1.9 MB > max_field_bytes (1 MiB)
    response = _post(client, views_text, [image])
    assert response.status_code == 413, response.text
    assert response.json()["errors"][0]["field"] == "views" and parsed == []
    response = _post(client, json.dumps([row]), [b"\x89PNG" + b"\0" * (64 * 1024)])
    assert response.status_code == 413 and response.json()["errors"][0] == {
        "field": "images", "detail": f"> {64 * 1024} bytes", "index": 0}
    response = client.post("/v1/targets", data={"views": json.dumps([row])},
                           files=[("images", ("a.png", image, "image/png")), ("views", ("v.json", b"[]", "text/plain"))])
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "views"
    assert parsed == []


def test_views_are_parsed_off_the_event_loop(client, monkeypatch):
    """While one request's JSON is being parsed, /healthz is answered."""
    import teacher_service.api.service as service_module

    entered, release = threading.Event(), threading.Event()
    outcome = {}
    real_parse = service_module.parse_views

    def slow_parse(raw):
        entered.set()
        outcome["released"] = release.wait(timeout=20)  # False if /healthz waited for the parse
        return real_parse(raw)

    monkeypatch.setattr(service_module, "parse_views", slow_parse)
    row, image = _one_view()
    thread = threading.Thread(target=lambda: outcome.setdefault("post", _post(client, json.dumps([row]), [image])))
    thread.start()
    try:
        assert entered.wait(timeout=60)
        assert client.get("/healthz").status_code == 200
    finally:
        release.set()
        thread.join(timeout=60)
    assert outcome["released"] is True
    assert outcome["post"].status_code == 200


# 5. credentials are never echoed or logged ----------------------------------------------------
def test_tokens_are_not_echoed_or_logged(server):
    secret = "S3cret-" + "q" * 24
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for header in (secret, f"Bearer\t{secret}", f"Basic {secret}", f"{secret} {secret}", "Bearer"):
            response = client.get("/v1/teacher", headers={"Authorization": header})
            assert response.status_code == 401, header
            assert secret not in response.text and "q" * 24 not in response.text, response.text
        # the real token after a tab is still the real token
        assert client.get("/v1/teacher", headers={"Authorization": f"Bearer\t{TEST_TOKEN}"}).status_code == 200
        assert client.get(f"/v1/teacher?token={secret}&access_token={secret}").status_code == 401
        assert client.get(f"/healthz?token={secret}").status_code == 200
        client.get("/readyz")  # one more line in the log after the ones above
    log = _log_after(server, "GET /readyz")
    assert secret not in log and "q" * 24 not in log
    assert "/v1/teacher?<redacted>" in log and "/healthz?<redacted>" in log


def _log_after(server, marker: str) -> str:
    deadline = time.monotonic() + 30
    while marker not in (log := server.log_path.read_text(errors="replace")):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.05)
    return log


# 6. a client that goes away mid-upload ---------------------------------------------------------
def test_client_disconnects_are_one_info_line_and_a_metric(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = client.get("/metrics").text
        for _ in range(5):
            sock = _upload_head(server.port, 200_000, expect_continue=True)
            sock.sendall(b"--b0undary\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n\r\n"
                         + b"\0" * 5000)
            sock.close()
        deadline = time.monotonic() + 30
        while _metric(text := client.get("/metrics").text, "distillery_client_disconnects_total") < (
                _metric(before, "distillery_client_disconnects_total") + 5):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
    assert _metric(text, "distillery_errors_total", {"kind": "internal-error"}) == 0
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert log.count("client went away before the request body ended: POST /v1/targets") >= 5


# 7. body-read timeout and connection limit ---------------------------------------------------
def test_a_body_that_never_arrives_gets_408_and_the_connection_is_closed(server):
    sock = _upload_head(server.port, 5000, expect_continue=False)
    sock.sendall(b"--b0undary\r\n")
    started = time.monotonic()
    reply = _read_all(sock)  # the server answers, then closes
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request-timeout" in reply and b"connection: close" in reply.lower()
    assert time.monotonic() - started < BODY_TIMEOUT_S + 20


def test_beyond_the_connection_limit_requests_get_503(server):
    # uvicorn counts the new connection too: with LIMIT_CONCURRENCY - 1 held, the next one is refused.
    held = [_upload_head(server.port, 5000, expect_continue=True) for _ in range(LIMIT_CONCURRENCY - 1)]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/healthz").status_code == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30
    while True:  # the held connections are gone: served again
        try:
            if httpx.get(server.url + "/healthz", timeout=30).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_serve_help_documents_the_limits():
    import subprocess
    import sys

    from teacher_service.api.testing import REPO_ROOT

    out = subprocess.run([sys.executable, "-m", "teacher_service.serve_cli", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--body-timeout-s", "--limit-concurrency", "--timeout-keep-alive-s", "--max-field-bytes",
                 "--max-image-bytes", "--max-image-pixels", "--decode-workers", "--docs", "--metrics-access"):
        assert flag in out, flag


# 8. HEAD probes; docs and metrics behind settings -------------------------------------------
def test_head_on_probes(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/healthz", "/readyz"):
            response = client.head(path)
            assert response.status_code == 200 and response.content == b"", path


def test_docs_and_metrics_access(teacher_path, loaded_teacher):
    docs_paths = ("/docs", "/redoc", "/openapi.json")
    cases = [
        ({"host": "127.0.0.1"}, "open", "open"),
        ({"host": "0.0.0.0"}, "off", "open"),
        ({"host": "0.0.0.0", "docs_access": "token", "metrics_access": "token"}, "token", "token"),
        ({"host": "127.0.0.1", "docs_access": "off"}, "off", "open"),
    ]
    for overrides, docs, metrics in cases:
        with TestClient(_app(teacher_path, loaded_teacher, **overrides)) as client:
            for path in docs_paths:
                anonymous, with_token = client.get(path), client.get(path, headers=AUTH)
                expected = {"open": (200, 200), "off": (404, 404), "token": (401, 200)}[docs]
                assert (anonymous.status_code, with_token.status_code) == expected, (overrides, path)
            anonymous, with_token = client.get("/metrics"), client.get("/metrics", headers=AUTH)
            expected = {"open": (200, 200), "token": (401, 200)}[metrics]
            assert (anonymous.status_code, with_token.status_code) == expected, overrides
            assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 200


def test_problem_documents_cap_their_errors():
    problem = RequestProblem("invalid-view", "x" * 10_000,
                             errors=[{"index": i, "detail": "y" * 10_000} for i in range(1000)])
    doc = problem.to_dict()
    assert len(doc["errors"]) == MAX_LISTED_ERRORS and doc["num_errors"] == 1000
    assert len(json.dumps(doc)) < 4096
