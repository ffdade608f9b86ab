"""Online endpoint, in process: settings, batcher, problem documents, routes (TestClient).

A real server on loopback is exercised in test_app_server.py; here the app runs in the
test process, with a tiny random-init teacher, and `dependency_overrides` where a test
needs a failing or missing part.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from detcore.views import View, plan_views
from label_store.wire import FINGERPRINT_HEADER, MEDIA_TYPE, fingerprint_digest, unpack_targets
from teacher_service.api import deps
from teacher_service.api.batching import BatchFailedError, DynamicBatcher
from teacher_service.api.problems import Overloaded, RequestProblem
from teacher_service.api.service import TargetService
from teacher_service.api.settings import ServeSettings, is_loopback
from teacher_service.api.testing import TEST_TOKEN, encode_image, make_tiny_teacher, random_image, targets_request
from teacher_service.app import create_app, load_teacher

CANVAS = (64, 64)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny.pt", canvas_hw=CANVAS)


@pytest.fixture(scope="module")
def loaded_teacher(teacher_path):
    return load_teacher(ServeSettings(teacher=teacher_path, auth_disabled=True, device="cpu"))


def _settings(teacher_path, **overrides):
    values = {"teacher": teacher_path, "token": TEST_TOKEN, "device": "cpu", **overrides}
    return ServeSettings(**values)


@pytest.fixture()
def client(teacher_path, loaded_teacher):
    loads = []

    def loader(settings):
        loads.append(settings)
        return loaded_teacher

    app = create_app(_settings(teacher_path, max_wait_ms=1), teacher_loader=loader)
    assert loads == []  # building the app loads nothing
    with TestClient(app, headers={"Authorization": f"Bearer {TEST_TOKEN}"}) as test_client:
        assert len(loads) == 1
        yield test_client


def _one_view(image_id=7, h=40, w=50, seed=0):
    pixels = random_image(h, w, seed)
    views = plan_views([(image_id, h, w)], canvas_hw=CANVAS)
    return views, encode_image(pixels)


# settings ----------------------------------------------------------------------------
def test_settings_refuse_unsafe_defaults(teacher_path, monkeypatch):
    monkeypatch.delenv("DISTILLERY_TOKEN", raising=False)
    with pytest.raises(ValidationError, match="expects a bearer token"):
        ServeSettings(teacher=teacher_path)
    with pytest.raises(ValidationError, match="loopback host"):
        ServeSettings(teacher=teacher_path, auth_disabled=True, host="0.0.0.0")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        ServeSettings(teacher=teacher_path, token="short")
    ok = ServeSettings(teacher=teacher_path, auth_disabled=True, host="::1")
    assert ok.auth_disabled and not ok.auth_required
    assert ServeSettings(teacher=teacher_path, token=TEST_TOKEN, host="0.0.0.0").auth_required


def test_settings_from_environment(teacher_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_TEACHER", str(teacher_path))
    monkeypatch.setenv("DISTILLERY_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("DISTILLERY_MAX_BATCH", "3")
    monkeypatch.setenv("DISTILLERY_CODECS", '{"fpn": "fp16"}')
    settings = ServeSettings()
    assert settings.max_batch == 3 and settings.codecs == {"fpn": "fp16"}
    assert settings.token.get_secret_value() == TEST_TOKEN
    assert TEST_TOKEN not in repr(settings)  # the secret never shows in logs
    with pytest.raises(ValidationError):
        ServeSettings(max_batch=0)


@pytest.mark.parametrize("host, expected", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("10.0.0.1", False),
                                            ("ray-head", False)])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


# batcher -----------------------------------------------------------------------------
# Concurrent steps are ordered with events, never with wall-clock sleeps. A deadline far
# beyond any test (`_NEVER_S`) turns "did not wait" into "finished at all"; `_HANG_S` only
# turns a hang into a failure.
_NEVER_S = 3600.0
_HANG_S = 60.0


async def _until(condition, max_yields=1000):
    """Yield to the event loop (no wall-clock wait) until ``condition()`` holds."""
    for _ in range(max_yields):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the event loop went idle before the condition held")


async def _entered(event: threading.Event) -> None:
    """Wait, without blocking the loop, until the worker thread has set ``event``."""
    assert await asyncio.to_thread(event.wait, _HANG_S), "run_batch was never called"


def test_batcher_groups_concurrent_items_and_keeps_order():
    calls: list[list[int]] = []

    def run(items):
        calls.append(list(items))
        return [i * 10 for i in items]

    async def main():
        batcher = DynamicBatcher(run, max_batch=4, max_wait_s=0.05, max_queue=32)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(6)), batcher.submit([100, 101]))
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert results == [[0], [10], [20], [30], [40], [50], [1000, 1010]]
    assert sorted(i for call in calls for i in call) == [0, 1, 2, 3, 4, 5, 100, 101]
    assert max(len(c) for c in calls) == 4 and all(len(c) <= 4 for c in calls)
    assert len(calls) == 2


def test_batcher_waits_only_for_announced_views():
    calls: list[list[str]] = []

    def run(items):
        calls.append(list(items))
        return items

    async def main():
        batcher = DynamicBatcher(run, max_batch=8, max_wait_s=_NEVER_S, max_queue=32)
        batcher.start()
        # Nothing announced: a lone request runs at once, long before its deadline.
        lone = await asyncio.wait_for(batcher.submit(["alone"]), _HANG_S)
        # Another request is still decoding two views: the first one waits for them.
        batcher.announce(2)
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await _until(lambda: batcher.queue_depth == 1)
        for _ in range(50):  # give the worker every chance to take "a" alone
            await asyncio.sleep(0)
        held = batcher.queue_depth
        batcher.retract(2)
        late = asyncio.ensure_future(batcher.submit(["b", "c"]))
        together = await asyncio.wait_for(asyncio.gather(first, late), _HANG_S)
        # A request that fails while decoding retracts its views: no wait until the deadline.
        batcher.announce(1)
        task = asyncio.ensure_future(batcher.submit(["d"]))
        await _until(lambda: batcher.queue_depth == 1)
        batcher.retract(1)
        released = await asyncio.wait_for(task, _HANG_S)
        await batcher.close()
        return lone, held, together, released

    lone, held, together, released = asyncio.run(main())
    assert lone == ["alone"]
    assert held == 1  # "a" still waited for the announced views
    assert together == [["a"], ["b", "c"]]
    assert calls[1] == ["a", "b", "c"]
    assert released == ["d"] and calls[2] == ["d"]


def test_batcher_refuses_beyond_max_queue_immediately():
    entered = threading.Event()
    release = threading.Event()

    def run(items):
        entered.set()
        release.wait(_HANG_S)
        return items

    async def main():
        batcher = DynamicBatcher(run, max_batch=1, max_wait_s=0.0, max_queue=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await _entered(entered)  # "a" is in the forward pass; the queue is empty
        second = asyncio.ensure_future(batcher.submit(["b", "c"]))
        await _until(lambda: batcher.queue_depth == 2)
        # The forward pass is still blocked: an answer now cannot have waited for room.
        with pytest.raises(Overloaded) as info:
            await asyncio.wait_for(batcher.submit(["d"]), _HANG_S)
        refused_while_busy = not release.is_set()
        release.set()
        results = await asyncio.gather(first, second)
        await batcher.close()
        return info.value, refused_while_busy, results

    error, refused_while_busy, results = asyncio.run(main())
    assert error.status == 503 and int(error.headers["Retry-After"]) >= 1
    assert refused_while_busy
    assert results == [["a"], ["b", "c"]]


def test_batcher_failure_fails_only_that_batch():
    def run(items):
        if "bad" in items:
            raise RuntimeError("boom")
        return items

    async def main():
        batcher = DynamicBatcher(run, max_batch=1, max_wait_s=0.0, max_queue=8)
        batcher.start()
        with pytest.raises(BatchFailedError, match="boom"):
            await batcher.submit(["bad"])
        ok = await batcher.submit(["good"])
        await batcher.close()
        return ok

    assert asyncio.run(main()) == ["good"]


def test_batcher_skips_views_of_cancelled_requests():
    seen: list[str] = []
    entered = threading.Event()
    release = threading.Event()

    def run(items):
        seen.extend(items)
        entered.set()
        release.wait(_HANG_S)
        return items

    async def main():
        batcher = DynamicBatcher(run, max_batch=8, max_wait_s=0.0, max_queue=8)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(["first"]))
        await _entered(entered)
        doomed = asyncio.ensure_future(batcher.submit(["gone"]))
        await _until(lambda: batcher.queue_depth == 1)
        doomed.cancel()
        kept = asyncio.ensure_future(batcher.submit(["kept"]))
        await _until(lambda: doomed.done() and batcher.queue_depth == 2)
        release.set()
        out = await asyncio.wait_for(asyncio.gather(blocker, kept), _HANG_S)
        await batcher.close()
        return out

    assert asyncio.run(main()) == [["first"], ["kept"]]
    assert "gone" not in seen


def test_problem_survives_pickling():
    problem = RequestProblem("invalid-image", "bad", errors=[{"index": 2, "image_id": 9}])
    copy = pickle.loads(pickle.dumps(problem))
    assert (copy.kind, copy.status, copy.errors) == ("invalid-image", 422, [{"index": 2, "image_id": 9}])
    overloaded = pickle.loads(pickle.dumps(Overloaded("full", 3)))
    assert overloaded.status == 503 and overloaded.headers == {"Retry-After": "3"}
    with pytest.raises(ValueError, match="expects one of"):
        RequestProblem("nonsense", "x")


# routes ------------------------------------------------------------------------------
def test_targets_round_trip_in_process(client, loaded_teacher):
    views, image = _one_view()
    data, files = targets_request(views, [image] * len(views), targets="cls,box/p3")
    response = client.post("/v1/targets", data=data, files=files)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == MEDIA_TYPE
    fingerprint, specs, entries = unpack_targets(response.content)
    assert response.headers[FINGERPRINT_HEADER] == fingerprint_digest(fingerprint) == loaded_teacher.digest
    assert [s.name for s in specs] == ["cls/p3", "cls/p4", "cls/p5", "cls/p6", "cls/p7", "box/p3"]
    assert [(e["image_id"], e["view_id"]) for e in entries] == [(7, 0), (7, 1)]
    flipped = entries[1]["targets"]["cls/p3"]
    assert flipped.shape == (3, 8, 8) and flipped.dtype == np.float32
    assert not np.array_equal(entries[0]["targets"]["cls/p3"], flipped)  # the flip view differs


def test_teacher_description(client, loaded_teacher):
    body = client.get("/v1/teacher").json()
    assert body["digest"] == fingerprint_digest(body["fingerprint"]) == loaded_teacher.digest
    assert body["fingerprint"]["canvas_hw"] == list(CANVAS)
    assert [t["name"] for t in body["targets"]] == [s.name for s in loaded_teacher.specs]
    assert body["default_targets"][0] == "cls/p3" and "backbone/c3" not in body["default_targets"]
    assert body["limits"]["max_queue"] == 64


def test_problem_documents_for_bad_requests(client):
    views, image = _one_view()
    good = [v.to_dict() for v in views]

    def post(rows, images, **extra):
        data, files = targets_request(rows, images, **extra)
        return client.post("/v1/targets", data=data, files=files)

    cases = {
        "missing-views": client.post("/v1/targets", files=[("images", ("a.png", image, "image/png"))]),
        "not-json": client.post("/v1/targets", data={"views": "[{"}, files=[("images", ("a.png", image, "image/png"))]),
        "count": post(good, [image]),
        "empty": post([], [image]),
        "field": post([{k: v for k, v in good[0].items() if k != "scale"}], [image]),
        "canvas": post([dict(good[0], canvas_h=128, canvas_w=128, image_h=40, image_w=50)], [image]),
        "too-big-scale": post([dict(good[0], scale=5.0)], [image]),
        "size": post([dict(good[0], image_h=41)], [image]),
        "group": post(good, [image, image], targets="cls,logits"),
        "flip-text": post([dict(good[0], flip="false")], [image]),
        "fractional-size": post([dict(good[0], image_h=40.5)], [image]),
        "unknown-field": post([dict(good[0], flipped=True)], [image]),
    }
    expected = {
        "missing-views": (422, "invalid-request"), "not-json": (422, "invalid-request"),
        "count": (422, "invalid-request"), "empty": (422, "invalid-request"),
        "field": (422, "invalid-view"), "canvas": (422, "invalid-view"), "too-big-scale": (422, "invalid-view"),
        "size": (422, "image-size-mismatch"), "group": (422, "unknown-target"),
        "flip-text": (422, "invalid-view"), "fractional-size": (422, "invalid-view"),
        "unknown-field": (422, "invalid-view"),
    }
    for name, response in cases.items():
        status, kind = expected[name]
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), name
        doc = response.json()
        assert doc["type"].endswith(":" + kind), (name, doc)
        assert doc["status"] == status and doc["title"] and doc["detail"] and isinstance(doc["errors"], list), name
    assert cases["size"].json()["errors"][0]["index"] == 0
    assert cases["size"].json()["errors"][0]["image_id"] == 7
    assert cases["group"].json()["errors"][0]["value"] == "logits"


def test_unsupported_media_type_and_malformed_multipart(client):
    response = client.post("/v1/targets", json={"views": []})
    assert response.status_code == 415 and response.json()["type"].endswith("unsupported-media-type")
    response = client.post(
        "/v1/targets", content=b"--xyz\r\nnot a part", headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["status"] == 400


def test_too_many_views_is_413(teacher_path, loaded_teacher):
    app = create_app(_settings(teacher_path, max_queue=2), teacher_loader=lambda s: loaded_teacher)
    views = plan_views([(1, 40, 50), (2, 40, 50)], canvas_hw=CANVAS)  # 4 views > max_queue
    image = encode_image(random_image(40, 50))
    with TestClient(app, headers={"Authorization": f"Bearer {TEST_TOKEN}"}) as test_client:
        data, files = targets_request(views, [image] * 4)
        response = test_client.post("/v1/targets", data=data, files=files)
    assert response.status_code == 413, response.text
    assert response.json()["errors"][0]["field"] in {"views", "body"}


def test_unknown_route_is_a_problem_document(client):
    response = client.get("/v2/nothing")
    assert response.status_code == 404 and response.json()["type"].endswith("not-found")
    response = client.get("/v1/targets")
    assert response.status_code == 405 and response.json()["status"] == 405


def test_failed_forward_is_500_and_server_goes_on(client, loaded_teacher):
    class BrokenTeacher:
        def __getattr__(self, name):
            return getattr(loaded_teacher, name)

        def forward(self, batch):
            raise RuntimeError("device lost")

    app = client.app
    broken = TargetService(BrokenTeacher(), app.state.settings, app.state.metrics)

    async def broken_service():
        broken.start()  # idempotent; runs in the app's event loop
        return broken

    app.dependency_overrides[deps.get_service] = broken_service
    views, image = _one_view()
    try:
        data, files = targets_request(views[:1], [image])
        response = client.post("/v1/targets", data=data, files=files)
    finally:
        app.dependency_overrides.clear()
        client.portal.call(broken.close)
    assert response.status_code == 500 and "device lost" in response.json()["detail"]
    data, files = targets_request(views[:1], [image])
    assert client.post("/v1/targets", data=data, files=files).status_code == 200
    metrics = client.get("/metrics").text
    assert 'distillery_errors_total{kind="internal-error"} 1.0' in metrics


def test_not_ready_without_lifespan(teacher_path):
    app = create_app(_settings(teacher_path), teacher_loader=lambda s: pytest.fail("must not load"))
    test_client = TestClient(app)  # no `with`: the lifespan does not run
    assert test_client.get("/healthz").status_code == 200
    response = test_client.get("/readyz")
    assert response.status_code == 503 and response.json()["type"].endswith("not-ready")
    assert response.headers["retry-after"] == "1"


def test_auth_is_checked_before_the_body(client):
    views, image = _one_view()
    data, files = targets_request(views, [image, image])
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": f"Basic {TEST_TOKEN}"}):
        response = client.post("/v1/targets", data=data, files=files, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/v1/teacher", headers={"Authorization": ""}).status_code == 401
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_view_objects_and_json_text_are_both_accepted(client):
    service = client.app.state.service
    views, image = _one_view()
    body_objects = client.portal.call(service.compute, views, [image, image], None)
    body_text = client.portal.call(service.compute, json.dumps([v.to_dict() for v in views]), [image, image], None)
    assert body_objects == body_text
    assert isinstance(View.from_dict(views[0].to_dict()), View)


def test_fpn_is_served_with_a_basis_free_codec_and_a_transform_codec_is_refused(teacher_path, loaded_teacher):
    from label_store.schema import BASIS_FREE_CODECS

    fpn = [spec for spec in loaded_teacher.specs if spec.group == "fpn"]
    assert fpn and all(spec.codec == BASIS_FREE_CODECS["fpn"] and spec.transform is None for spec in fpn)
    with pytest.raises(ValueError, match="no store to fit"):
        load_teacher(ServeSettings(teacher=teacher_path, auth_disabled=True, device="cpu", codecs={"fpn": "pca-std5"}))


def test_landscape_and_portrait_views_on_a_non_square_canvas(tmp_path):
    """A teacher for --canvas 48x64 answers views on 48x64 and on its transpose (one canvas per request)."""
    path = make_tiny_teacher(tmp_path / "wide.pt", canvas_hw=(48, 64))
    teacher = load_teacher(ServeSettings(teacher=path, auth_disabled=True, device="cpu"))
    assert teacher.canvases == ((48, 64), (64, 48))
    landscape = plan_views([(1, 30, 40)], canvas_hw=(48, 64), flip=False)
    portrait = plan_views([(2, 40, 30)], canvas_hw=(48, 64), flip=False)
    assert (portrait[0].canvas_h, portrait[0].canvas_w) == (64, 48)
    images = {1: encode_image(random_image(30, 40, 1)), 2: encode_image(random_image(40, 30, 2))}
    app = create_app(ServeSettings(teacher=path, auth_disabled=True, device="cpu", max_wait_ms=1), teacher_loader=lambda s: teacher)
    with TestClient(app) as client:
        shapes = {}
        for views in (landscape, portrait):
            data, files = targets_request(views, [images[views[0].image_id]], targets="cls/p3")
            response = client.post("/v1/targets", data=data, files=files)
            assert response.status_code == 200, response.text
            _, specs, entries = unpack_targets(response.content)
            shapes[views[0].image_id] = (specs[0].shape, entries[0]["targets"]["cls/p3"].shape)
        assert shapes == {1: ((3, 6, 8), (3, 6, 8)), 2: ((3, 8, 6), (3, 8, 6))}
        data, files = targets_request(landscape + portrait, [images[1], images[2]], targets="cls/p3")
        mixed = client.post("/v1/targets", data=data, files=files)
        assert mixed.status_code == 422 and "one canvas" in mixed.json()["detail"]
        data, files = targets_request([dict(landscape[0].to_dict(), canvas_h=64, canvas_w=64)], [images[1]])
        assert client.post("/v1/targets", data=data, files=files).status_code == 422
    # The batcher may join requests of both canvases: one forward per canvas, the same answers.
    prepared = [teacher.prepare_view(v, images[v.image_id], ["cls/p3"]) for v in landscape + portrait]
    joined = teacher.forward(prepared)
    alone = [teacher.forward([p])[0] for p in prepared]
    for a, b in zip(joined, alone):
        np.testing.assert_allclose(a["cls/p3"], b["cls/p3"], rtol=1e-5, atol=1e-6)
