"""A small stand-in for the teacher endpoint, served by uvicorn in a thread for the tests.

It speaks the protocol of `student_trainer.sources.RemoteSource` (``GET /v1/teacher``,
``POST /v1/targets`` multipart with ``views``, ``images`` and ``targets``, the
`label_store.wire` body, ``X-Teacher-Fingerprint``, 503 + ``Retry-After``), running the
test's teacher in this test process. It is test code: student_trainer never imports it.
"""


import json
import socket
import tempfile
import threading
import time
from pathlib import Path


class FakeEndpoint:
    """``with FakeEndpoint(teacher_path, token="t", overload_first=1) as url: ...``"""

    def __init__(self, teacher_path: Path, *, token: str = "secret", overload_first: int = 0, codec: str = "fp32") -> None:
        self.teacher_path = Path(teacher_path)
        self.token = token
        self.overload_first = overload_first
        self.codec = codec
        self.requests: list[list[tuple[int, int]]] = []
        self.overloaded = 0
        self._server = None
        self._thread = None

    def app(self):
        import torch
        from fastapi import FastAPI, HTTPException, Request, Response

        from detcore.checkpoint import load_detector_with_meta, teacher_fingerprint
        from detcore.images import load_image
        from detcore.views import View, content_hash, render
        from label_store import default_target_specs
        from label_store.wire import FINGERPRINT_HEADER, MEDIA_TYPE, fingerprint_digest, pack_targets

        teacher, meta = load_detector_with_meta(self.teacher_path)
        fingerprint = teacher_fingerprint(self.teacher_path)
        digest = fingerprint_digest(fingerprint)
        config = teacher.config
        groups = ("cls", "box", "fpn", "backbone")
        specs = default_target_specs(
            config.num_classes, config.reg_max, tuple(meta["canvas_hw"]), list(config.strides), config.fpn_channels,
            backbone_channels=list(teacher.backbone.out_channels), groups=groups, codecs={g: self.codec for g in groups},
        )
        app = FastAPI()

        def check(request: Request) -> None:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                raise HTTPException(status_code=401, detail="bad token")

        @app.get("/v1/teacher")
        def describe(request: Request):
            check(request)
            return {"fingerprint": fingerprint, "targets": [s.to_dict() for s in specs], "digest": digest}

        @app.post("/v1/targets")
        async def targets(request: Request):
            check(request)
            if self.overloaded < self.overload_first:
                self.overloaded += 1
                return Response(status_code=503, headers={"Retry-After": "0"}, content=b"busy")
            form = await request.form()
            views = [View.from_dict(v) for v in json.loads(form["views"])]
            files = form.getlist("images")
            wanted = form.get("targets", "cls,box,fpn").split(",")
            chosen = [s for s in specs if s.group in wanted]
            self.requests.append([v.key for v in views])
            entries, images = [], []
            with tempfile.TemporaryDirectory() as folder:
                for view, upload in zip(views, files):
                    path = Path(folder) / f"{view.image_id}-{view.view_id}.img"
                    path.write_bytes(await upload.read())
                    pixels = load_image(path, view.image_id)
                    images.append(render(pixels, view).image)
                    entries.append({"image_id": view.image_id, "view_id": view.view_id, "content_hash": content_hash(pixels)})
            with torch.no_grad():
                outputs = teacher(torch.stack(images), with_backbone=True).to_targets(("cls", "box", "fpn", "backbone"))
            for index, entry in enumerate(entries):
                entry["targets"] = {s.name: outputs[s.name][index].numpy() for s in chosen}
            body = pack_targets(entries, chosen, fingerprint)
            return Response(content=body, media_type=MEDIA_TYPE, headers={FINGERPRINT_HEADER: digest})

        return app

    def __enter__(self) -> str:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app(), log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("fake endpoint did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
