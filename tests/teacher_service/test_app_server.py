"""Online endpoint against a real server: `distill serve` (uvicorn) in a subprocess on loopback.

Every endpoint and error path over real HTTP with httpx: targets equal a direct teacher
forward (and a store's targets for the same views), auth, 413, the 422s, overload (503 +
Retry-After, healthy after), and dynamic batching of concurrent requests.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from detcore.views import content_hash, plan_views, render_array
from label_store import decode_targets, encode_targets
from label_store.wire import FINGERPRINT_HEADER, MEDIA_TYPE, fingerprint_digest, unpack_targets
from teacher_service.api.testing import (
    REPO_ROOT,
    TEST_TOKEN,
    ServerProcess,
    encode_image,
    make_tiny_teacher,
    random_image,
    targets_request,
)

pytestmark = pytest.mark.slow

CANVAS = (64, 64)
MAX_REQUEST_BYTES = 256 * 1024
IMAGES = {11: (40, 50), 12: (64, 30)}  # image_id -> (h, w)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("serve") / "tiny.pt", canvas_hw=CANVAS)


@pytest.fixture(scope="module")
def server(teacher_path):
    options = ["--max-batch", "8", "--max-wait-ms", "150", "--max-queue", "64",
               "--max-request-bytes", str(MAX_REQUEST_BYTES), "--torch-threads", "1"]
    with ServerProcess(teacher_path, options=options) as running:
        yield running
        assert running.alive(), running.log()


@pytest.fixture(scope="module")
def pixels():
    return {image_id: random_image(h, w, seed=image_id) for image_id, (h, w) in IMAGES.items()}


@pytest.fixture(scope="module")
def views():
    return plan_views([(i, h, w) for i, (h, w) in IMAGES.items()], canvas_hw=CANVAS, scales=(1.0, 0.5))


def _client(server, token=TEST_TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def _metric(text: str, name: str, labels: dict | None = None) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def test_probes_need_no_token(server):
    with _client(server, token=None) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and len(ready.json()["digest"]) == 64
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        for family in ("distillery_requests_total", "distillery_request_duration_seconds_bucket",
                       "distillery_batch_size_bucket", "distillery_queue_depth", "distillery_errors_total"):
            assert family in metrics.text or family == "distillery_errors_total"
        assert _metric(metrics.text, "distillery_teacher_ready") == 1.0


def test_auth_enforced(server, views, pixels):
    data, files = targets_request(views[:1], [encode_image(pixels[11])])
    for token in (None, "not-the-token-0123456789"):
        with _client(server, token=token) as client:
            response = client.post("/v1/targets", data=data, files=files)
            assert response.status_code == 401, response.text
            assert response.json()["type"].endswith("unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert client.get("/v1/teacher").status_code == 401
    with _client(server) as client:
        assert client.post("/v1/targets", data=data, files=files).status_code == 200
        assert client.get("/v1/teacher").status_code == 200


def _direct_forward(teacher_path, view_list, pixels, names):
    """The teacher run in this process on the same canvases, as one batch, one thread."""
    from detcore.checkpoint import load_detector

    model = load_detector(teacher_path, map_location="cpu")
    model.eval()
    batch = torch.from_numpy(np.stack([render_array(pixels[v.image_id], v) for v in view_list]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            with_backbone = any(n.startswith("backbone/") for n in names)
            outputs = model(batch, with_backbone=with_backbone).to_targets(("cls", "box", "fpn") + (("backbone",) if with_backbone else ()))
    finally:
        torch.set_num_threads(threads)
    return [{name: outputs[name][i].numpy().copy() for name in names} for i in range(len(view_list))]


def test_targets_equal_direct_forward(server, teacher_path, views, pixels):
    images = [encode_image(pixels[v.image_id]) for v in views]
    assert len(views) == 8  # one batch of max_batch views
    with _client(server) as client:
        info = client.get("/v1/teacher").json()
        data, files = targets_request(views, images, targets="cls,box,fpn,backbone")
        response = client.post("/v1/targets", data=data, files=files)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == MEDIA_TYPE
    fingerprint, specs, entries = unpack_targets(response.content)
    assert response.headers[FINGERPRINT_HEADER] == fingerprint_digest(fingerprint) == info["digest"]
    assert fingerprint == info["fingerprint"] and fingerprint["canvas_hw"] == list(CANVAS)
    assert [s.to_dict() for s in specs] == info["targets"]  # all four groups asked for
    assert [(e["image_id"], e["view_id"]) for e in entries] == [v.key for v in views]
    assert [e["content_hash"] for e in entries] == [content_hash(pixels[v.image_id]) for v in views]

    names = [s.name for s in specs]
    direct = _direct_forward(teacher_path, views, pixels, names)
    for entry, expected in zip(entries, direct):
        # Bit-equal to the store's encoding of the direct forward ...
        reference = decode_targets(encode_targets(expected, specs), specs)
        for spec in specs:
            np.testing.assert_array_equal(entry["targets"][spec.name], reference[spec.name], err_msg=spec.name)
            # ... and within the codec's stated error of the float32 forward.
            _, scale, _ = spec.target_codec.encode(expected[spec.name])
            bound = spec.target_codec.error_bound(expected[spec.name], scale)
            assert np.all(np.abs(entry["targets"][spec.name] - expected[spec.name]) <= bound + 1e-6), spec.name


def test_default_targets_are_cls_box_fpn(server, views, pixels):
    with _client(server) as client:
        data, files = targets_request(views[:2], [encode_image(pixels[11])] * 2)
        response = client.post("/v1/targets", data=data, files=files)
    _, specs, entries = unpack_targets(response.content)
    assert {s.name.split("/")[0] for s in specs} == {"cls", "box", "fpn"}
    assert len(entries) == 2


def test_request_too_large(server, views, pixels):
    data, files = targets_request(views[:1], [encode_image(pixels[11])])
    with _client(server) as client:
        big = [("images", ("big.bin", b"\0" * (MAX_REQUEST_BYTES + 1), "application/octet-stream"))]
        response = client.post("/v1/targets", data=data, files=big)
        assert response.status_code == 413 and response.json()["type"].endswith("request-too-large")
        assert "Content-Length" in response.json()["detail"]
        # A body larger than the socket buffers is read and dropped first, so the client
        # gets the 413 rather than a reset connection.
        huge = [("images", ("big.bin", b"\0" * (3 * MAX_REQUEST_BYTES), "application/octet-stream"))]
        response = client.post("/v1/targets", data=data, files=huge)
        assert response.status_code == 413

        # No Content-Length (chunked upload): refused while reading.
        request = client.build_request("POST", "/v1/targets", data=data, files=big)
        body = request.read()

        def chunks():
            for start in range(0, len(body), 16384):
                yield body[start : start + 16384]

        response = client.post(
            "/v1/targets", content=chunks(), headers={"Content-Type": request.headers["Content-Type"]}
        )
        assert response.status_code == 413, response.text
        assert "Got at least" in response.json()["detail"]
        assert client.post("/v1/targets", data=data, files=files).status_code == 200


def test_unprocessable_requests_name_the_view(server, views, pixels):
    good_image = encode_image(pixels[11])
    png = encode_image(pixels[12])
    rows = [views[0].to_dict(), views[4].to_dict(), views[1].to_dict()]  # ids 11, 12, 11
    cases = {
        "corrupt": ([good_image, png[: len(png) // 2], good_image], None, "invalid-image", 1, 12),
        "non-image": ([good_image, png, b"this is not an image"], None, "invalid-image", 2, 11),
        "wrong-size": ([good_image, good_image, good_image], None, "image-size-mismatch", 1, 12),
    }
    with _client(server) as client:
        for name, (images, targets, kind, index, image_id) in cases.items():
            data, files = targets_request(rows, images, targets=targets)
            response = client.post("/v1/targets", data=data, files=files)
            assert response.status_code == 422, (name, response.text)
            doc = response.json()
            assert doc["type"].endswith(kind), (name, doc)
            assert [(e["index"], e["image_id"]) for e in doc["errors"]] == [(index, image_id)], (name, doc)
            assert f"image_id={image_id}" in doc["detail"]

        bad_view = dict(rows[0], scale=3.0)
        data, files = targets_request([rows[2], bad_view], [good_image, good_image])
        doc = client.post("/v1/targets", data=data, files=files).json()
        assert doc["status"] == 422 and doc["type"].endswith("invalid-view")
        assert doc["errors"][0]["index"] == 1 and doc["errors"][0]["image_id"] == 11

        data, files = targets_request(rows[:1], [good_image], targets="cls,heatmap")
        doc = client.post("/v1/targets", data=data, files=files).json()
        assert doc["status"] == 422 and doc["errors"] == [
            {"field": "targets", "value": "heatmap", "detail": "unknown target group or name"}
        ]
        metrics = client.get("/metrics").text
    assert _metric(metrics, "distillery_errors_total", {"kind": "invalid-image"}) >= 2
    assert _metric(metrics, "distillery_requests_total", {"route": "/v1/targets", "status": "422"}) >= 5


def test_concurrent_requests_are_batched(server, views, pixels):
    image = encode_image(pixels[11])
    with _client(server) as client:
        before = client.get("/metrics").text

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
            requests = []
            for view in views[:4]:
                data, files = targets_request([view], [image])
                requests.append(client.post("/v1/targets", data=data, files=files))
            return await asyncio.gather(*requests)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 4
    for view, response in zip(views[:4], responses):
        _, _, entries = unpack_targets(response.content)
        assert [(e["image_id"], e["view_id"]) for e in entries] == [view.key]
    with _client(server) as client:
        after = client.get("/metrics").text
    batches = _metric(after, "distillery_batch_size_count") - _metric(before, "distillery_batch_size_count")
    singles = _metric(after, "distillery_batch_size_bucket", {"le": "1.0"}) - _metric(
        before, "distillery_batch_size_bucket", {"le": "1.0"}
    )
    viewed = _metric(after, "distillery_batch_size_sum") - _metric(before, "distillery_batch_size_sum")
    assert viewed == 4
    assert batches < 4 and singles < batches  # at least one forward pass held more than one view


def test_overload_answers_503_and_recovers(teacher_path, views, pixels):
    images = [encode_image(pixels[v.image_id]) for v in views[:3]]
    options = ["--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "4", "--torch-threads", "1"]
    server = ServerProcess(teacher_path, options=options).start()
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as client:
                requests = []
                for _ in range(24):
                    data, files = targets_request(views[:3], images)
                    requests.append(client.post("/v1/targets", data=data, files=files))
                return await asyncio.gather(*requests)

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        refused = [r for r in responses if r.status_code == 503]
        assert refused, codes
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["type"].endswith("overloaded")
        for response in responses:
            if response.status_code == 200:
                assert len(unpack_targets(response.content)[2]) == 3
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
            assert client.get("/readyz").status_code == 200
            data, files = targets_request(views[:3], images)
            assert client.post("/v1/targets", data=data, files=files).status_code == 200
            metrics = client.get("/metrics").text
        assert _metric(metrics, "distillery_errors_total", {"kind": "overloaded"}) == len(refused)
        assert _metric(metrics, "distillery_queue_depth") == 0
        assert server.alive()
    finally:
        # SIGTERM drains, then the server exits 143 (`teacher_service.drain`).
        assert server.stop() == 143, server.log()
    assert "Application shutdown complete" in server.log()


def test_cli_refuses_unsafe_settings(teacher_path):
    env_base = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    cases = [
        (["--no-auth", "--host", "0.0.0.0"], {}, "loopback host"),
        ([], {}, "expects a bearer token"),
        (["--host", "0.0.0.0"], {"DISTILLERY_TOKEN": "short"}, "at least 16 characters"),
    ]
    for args, env, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "teacher_service.serve_cli", "--teacher", str(teacher_path), *args],
            cwd=REPO_ROOT, env={**env_base, **env}, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_targets_equal_the_stores_bytes(server, teacher_path, views, pixels, tmp_path):
    """A store written with the endpoint's own specs holds byte-identical views."""
    from label_store import TargetSpec, create_store, open_store
    from label_store.wire import read_header

    with _client(server) as client:
        info = client.get("/v1/teacher").json()
        images = [encode_image(pixels[v.image_id]) for v in views]
        data, files = targets_request(views, images, targets="cls,box,fpn")
        response = client.post("/v1/targets", data=data, files=files)
    assert response.status_code == 200, response.text
    specs = [TargetSpec.from_dict(row) for row in info["targets"] if row["name"].split("/")[0] != "backbone"]
    url = str(tmp_path / "store.zarr")
    store = create_store(url, info["fingerprint"], specs)
    direct = _direct_forward(teacher_path, views, pixels, [s.name for s in specs])
    with store.open_part("part-0") as part:
        for view, targets in zip(views, direct):
            record = {"image_id": view.image_id, "view_id": view.view_id, "view": view.to_json(),
                      "content_hash": content_hash(pixels[view.image_id]), "valid_region": view.valid_region}
            part.append(record, targets)
        part.commit()
    reader = open_store(url, expected_fingerprint=info["fingerprint"])
    header, start = read_header(response.content)
    _, got_specs, entries = unpack_targets(response.content)
    assert [s.to_dict() for s in got_specs] == [s.to_dict() for s in reader.targets]
    for row, entry in zip(header["views"], entries):
        blob = response.content[start + row["offset"] : start + row["offset"] + row["length"]]
        assert blob == reader.read_blob(row["image_id"], row["view_id"])
        stored = reader.read(row["image_id"], row["view_id"])
        for name, array in stored.items():
            np.testing.assert_array_equal(entry["targets"][name], array, err_msg=name)
        assert reader.record(row["image_id"], row["view_id"])["content_hash"] == entry["content_hash"]
