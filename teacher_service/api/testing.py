"""Helpers for tests and benchmarks of the online endpoint (not used by the endpoint itself).

`make_tiny_teacher` writes a random-init ``gfl_tiny`` checkpoint; `ServerProcess` runs
``distill serve`` (`teacher_service.serve_cli`) in a subprocess on a free loopback port and
stops it by PID; `encode_image` and `targets_request` build what a client sends;
`bomb_png` writes a tiny PNG that decodes to a huge image.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_TOKEN = "test-token-0123456789abcdef"


def make_tiny_teacher(
    path: str | Path,
    *,
    canvas_hw: tuple[int, int] = (64, 64),
    num_classes: int = 3,
    seed: int = 0,
    arch: str = "gfl_tiny",
) -> Path:
    """A random-init detector checkpoint (``gfl_tiny`` unless ``arch``; classes ``c0..``) at ``canvas_hw``."""
    import torch

    from detcore.checkpoint import save_checkpoint
    from detcore.models.gfl import build_detector

    torch.manual_seed(seed)
    model = build_detector(arch, num_classes)
    return save_checkpoint(path, model, classes=[f"c{i}" for i in range(num_classes)], canvas_hw=canvas_hw)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[H, W, 3]`` noise."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encode_image(pixels: np.ndarray, format: str = "PNG") -> bytes:
    """Encode uint8 ``[H, W, 3]`` pixels as an image file (PNG is lossless)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def bomb_png(height: int, width: int) -> bytes:
    """A 1-bit grayscale PNG of ``height x width`` black pixels: a few KB per 100 million
    pixels, written row by row without ever holding the pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_piece = max(1, (1 << 20) // len(row))
    pieces = []
    for start in range(0, height, rows_per_piece):
        pieces.append(compressor.compress(row * min(rows_per_piece, height - start)))
    pieces.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(pieces)) + chunk(b"IEND", b"")


def targets_request(
    views: Sequence[Any], images: Sequence[bytes], targets: str | None = None
) -> tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]]]:
    """``(data, files)`` for ``httpx.post(url, data=data, files=files)`` to ``/v1/targets``."""
    rows = [v.to_dict() if hasattr(v, "to_dict") else v for v in views]
    data = {"views": json.dumps(rows)}
    if targets is not None:
        data["targets"] = targets
    files = [("images", (f"view{i}.png", blob, "application/octet-stream")) for i, blob in enumerate(images)]
    return data, files


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m teacher_service.serve_cli`` in a subprocess on 127.0.0.1, as a context manager.

    Args:
        teacher: checkpoint path.
        token: bearer token (None: ``--no-auth``).
        options: extra command-line options (``["--max-batch", "8"]``).
        env: extra environment variables.
        log_path: where the server's stdout/stderr go (default: a file next to the teacher).
    """

    def __init__(
        self,
        teacher: str | Path,
        *,
        token: str | None = TEST_TOKEN,
        options: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 90.0,
    ) -> None:
        self.teacher = Path(teacher)
        self.token = token
        self.options = list(options)
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else self.teacher.with_suffix(f".server-{self.port}.log")
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.token is None else {"Authorization": f"Bearer {self.token}"}

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "teacher_service.serve_cli", "--teacher", str(self.teacher),
               "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", *self.options]
        if self.token is None:
            cmd.append("--no-auth")
        return cmd

    def start(self) -> "ServerProcess":
        import httpx

        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **self.env}
        env.pop("DISTILLERY_TOKEN", None)
        if self.token is not None:
            env["DISTILLERY_TOKEN"] = self.token
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready after {self.startup_timeout_s} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux /proc)."""
        return self._status_bytes("VmRSS:")

    def peak_rss_bytes(self) -> int:
        """Highest resident set size the server process has had so far (``VmHWM``, Linux /proc)."""
        return self._status_bytes("VmHWM:")

    def _status_bytes(self, field: str) -> int:
        if self.process is None:
            return 0
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    def log(self, tail: int | None = 4000) -> str:
        """The server's output: its last ``tail`` characters (None: all of it)."""
        try:
            text = self.log_path.read_text(errors="replace")
            return text if tail is None else text[-tail:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM by PID, then SIGKILL after 15 s; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
