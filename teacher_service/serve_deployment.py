"""The online endpoint as a Ray Serve deployment (``distill serve --ray``).

The deployment's HTTP ingress is the very app `teacher_service.app.create_app` builds
(routes, auth, limits, problem documents, metrics, dynamic batching per replica): each
replica builds it after construction (``__serve_build_asgi_app__``) and Serve runs its
lifespan, which loads the teacher once per replica.

Trainers running inside the same Ray cluster may skip HTTP and call the handle::

    from ray import serve
    handle = serve.get_deployment_handle("TeacherDeployment", app_name="distillery-teacher")
    body = handle.targets.remote(views, images, "cls,box").result()   # label_store.wire body

(`student_trainer` never imports this module; the two names above are the contract.)
Bad requests raise `teacher_service.api.problems.RequestProblem` through the handle, with
the same ``kind``/``errors`` as the HTTP problem document.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Sequence

from ray import serve

from teacher_service.api.problems import RequestProblem
from teacher_service.api.settings import ServeSettings

logger = logging.getLogger(__name__)

APP_NAME = "distillery-teacher"
DEPLOYMENT_NAME = "TeacherDeployment"


@serve.ingress()
class TeacherDeployment:
    """One replica: the FastAPI app (HTTP) plus handle methods over the same service."""

    def __init__(self, settings: ServeSettings) -> None:
        self._settings = settings

    def __serve_build_asgi_app__(self):
        from teacher_service.app import create_app

        return create_app(self._settings)

    def _service(self):
        service = getattr(self.app.state, "service", None)
        if service is None:
            raise RequestProblem("not-ready", "The teacher is not loaded yet.", headers={"Retry-After": "1"})
        return service

    async def targets(
        self, views: Sequence[dict[str, Any]], images: Sequence[bytes], groups: str | Sequence[str] | None = None
    ) -> bytes:
        """Same body as ``POST /v1/targets``: a `label_store.wire` message."""
        return await self._service().compute(list(views), list(images), groups)

    async def teacher(self) -> dict[str, Any]:
        """Same JSON as ``GET /v1/teacher``."""
        return self._service().describe()


def build_application(settings: ServeSettings, *, num_replicas: int = 1, num_gpus_per_replica: float = 0.0):
    """A bound Serve application of `TeacherDeployment` (not yet running)."""
    if num_replicas < 1:
        raise ValueError(f"build_application(num_replicas=) expects >= 1. Got {num_replicas}.")
    actor_options: dict[str, Any] = {"num_cpus": 1}
    if num_gpus_per_replica > 0:
        actor_options = {"num_cpus": 1, "num_gpus": num_gpus_per_replica}
    deployment = serve.deployment(
        TeacherDeployment,
        name=DEPLOYMENT_NAME,
        num_replicas=num_replicas,
        ray_actor_options=actor_options,
        # Requests beyond this per replica are queued by Serve's router; the app's own
        # bounded batcher answers 503 past max_queue views.
        max_ongoing_requests=max(8, settings.max_queue),
    )
    return deployment.bind(settings)


def deploy(settings: ServeSettings, *, num_replicas: int = 1, address: str | None = None, blocking: bool = True) -> int:
    """Connect to (or start) Ray, start Serve on ``settings.host:port`` and run the app.

    Replicas ask for one GPU each when the cluster has GPUs, else CPUs only. With
    ``blocking`` the call waits for SIGINT/SIGTERM, then deletes the app and leaves the
    cluster (it never stops a cluster it joined).
    """
    import os
    from pathlib import Path

    import ray

    started_ray = False
    if not ray.is_initialized():
        # Replicas import teacher_service from the driver's checkout when it is not installed.
        repo_root = str(Path(__file__).resolve().parent.parent)
        pythonpath = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
        if address:
            ray.init(address=address, runtime_env=runtime_env)
        else:
            ray.init(include_dashboard=False, runtime_env=runtime_env)
            started_ray = True
    num_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    per_replica = 1.0 if num_gpus >= 1 else 0.0
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_application(settings, num_replicas=num_replicas, num_gpus_per_replica=per_replica)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    logger.info(
        "Ray Serve app %r on http://%s:%d with %d replica(s)%s",
        APP_NAME, settings.host, settings.port, num_replicas, " on GPUs" if per_replica else " on CPUs",
    )
    if not blocking:
        return 0
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.delete(APP_NAME)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    return 0
