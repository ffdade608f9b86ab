"""Ctrl-C and SIGTERM drain `distill serve`: the request in flight is answered, new ones get 503, the server exits 130 / 143."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest

from detcore.views import plan_views
from label_store.wire import unpack_targets
from teacher_service.api.testing import ServerProcess, encode_image, make_tiny_teacher, random_image, targets_request

pytestmark = pytest.mark.slow


def _queue_depth(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("distillery_queue_depth "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_drains_the_server(tmp_path, signum):
    teacher = make_tiny_teacher(tmp_path / "tiny.pt", canvas_hw=(64, 64))
    # 48 views, one forward pass each: the request is in flight long enough to signal meanwhile.
    views = plan_views([(11, 40, 50)], canvas_hw=(64, 64), scales=tuple(1 - 0.02 * i for i in range(24)), flip=True)
    image = encode_image(random_image(40, 50, seed=11))
    options = ["--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "64", "--torch-threads", "1"]
    server = ServerProcess(teacher, token=None, options=options).start()
    answer: dict[str, httpx.Response] = {}

    def in_flight() -> None:
        data, files = targets_request(views, [image] * len(views))
        answer["response"] = httpx.post(server.url + "/v1/targets", data=data, files=files, timeout=60)

    thread = threading.Thread(target=in_flight)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            thread.start()
            deadline = time.monotonic() + 30
            while _queue_depth(client) < 1:  # the request's views wait for their forward passes
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.05)
            server.process.send_signal(signum)
            refused = None
            while refused is None:  # a new request once the drain began
                assert time.monotonic() < deadline
                try:
                    response = client.get("/readyz")
                except httpx.TransportError:
                    break  # already drained and closed: the in-flight request was answered first
                if response.status_code == 503:
                    refused = response
        thread.join(timeout=60)
        code = server.process.wait(timeout=60)
    finally:
        server.stop()
    assert refused is not None, server.log()
    assert refused.json()["type"].endswith("draining") and refused.headers["retry-after"] == "1"
    assert answer["response"].status_code == 200, answer["response"].text
    assert len(unpack_targets(answer["response"].content)[2]) == len(views)
    assert code == 128 + signum, server.log()
    log = server.log(tail=None)  # the access lines of the polling above may push the drain's line out of a tail
    # The upload, and perhaps the probe just answered whose middleware had not yet returned.
    in_flight = re.search(r"draining: (\d+) request\(s\) in flight", log)
    assert in_flight is not None and int(in_flight.group(1)) >= 1, log
    assert f"interrupted by {signal.Signals(signum).name}: drained" in log
