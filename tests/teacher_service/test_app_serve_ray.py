"""The same app as a Ray Serve deployment: HTTP through Serve's proxy and the handle method."""

from __future__ import annotations

import os

import httpx
import pytest

from detcore.views import plan_views
from label_store.wire import FINGERPRINT_HEADER, unpack_targets
from teacher_service.api.problems import RequestProblem
from teacher_service.api.settings import ServeSettings
from teacher_service.api.testing import (
    REPO_ROOT,
    TEST_TOKEN,
    encode_image,
    free_port,
    make_tiny_teacher,
    random_image,
    targets_request,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}},
    )
    try:
        yield ray
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def test_serve_deployment_http_and_handle(ray_cluster, tmp_path):
    from ray import serve

    from teacher_service.serve_deployment import APP_NAME, DEPLOYMENT_NAME, deploy

    teacher = make_tiny_teacher(tmp_path / "tiny.pt", canvas_hw=(64, 64))
    port = free_port()
    settings = ServeSettings(teacher=teacher, token=TEST_TOKEN, host="127.0.0.1", port=port, device="cpu",
                             max_batch=4, max_wait_ms=20)
    assert deploy(settings, num_replicas=1, blocking=False) == 0

    pixels = random_image(40, 50, seed=3)
    views = plan_views([(5, 40, 50)], canvas_hw=(64, 64))
    images = [encode_image(pixels)] * len(views)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/readyz").status_code == 200
        data, files = targets_request(views, images, targets="cls,box")
        assert client.post("/v1/targets", data=data, files=files).status_code == 401
        response = client.post("/v1/targets", data=data, files=files,
                               headers={"Authorization": f"Bearer {TEST_TOKEN}"})
        assert response.status_code == 200, response.text
        info = client.get("/v1/teacher", headers={"Authorization": f"Bearer {TEST_TOKEN}"}).json()
        bad = client.post("/v1/targets", data={"views": "[1]"}, files=files[:1],
                          headers={"Authorization": f"Bearer {TEST_TOKEN}"})
        assert bad.status_code == 422 and bad.json()["type"].endswith("invalid-view")

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    body = handle.targets.remote([v.to_dict() for v in views], images, "cls,box").result(timeout_s=60)
    # Same views, same batch: the handle answers the very bytes HTTP does.
    assert body == response.content
    fingerprint, specs, entries = unpack_targets(body)
    assert response.headers[FINGERPRINT_HEADER] == info["digest"]
    assert fingerprint == info["fingerprint"]
    assert [s.name for s in specs][:1] == ["cls/p3"] and len(specs) == 10
    assert [(e["image_id"], e["view_id"]) for e in entries] == [(5, 0), (5, 1)]
    assert handle.teacher.remote().result(timeout_s=60)["digest"] == info["digest"]

    with pytest.raises(RequestProblem) as problem:
        handle.targets.remote([views[0].to_dict()], [b"not an image"], None).result(timeout_s=60)
    assert problem.value.kind == "invalid-image" and problem.value.errors[0]["image_id"] == 5
    serve.delete(APP_NAME)
