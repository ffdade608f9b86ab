"""docker-compose.yml: its topology, its validity, and its service commands run as local processes.

No Docker engine runs here, so `test_compose_services_as_local_processes` starts the
same topology from the compose file's own commands on loopback: the Ray head and one Ray
worker (`ray start ... --block`), the teacher API (`distill serve`), then the one-shot
precompute job against the head, and queries the API. Hostnames become 127.0.0.1 and
fixed ports become free ones; a few flags are added so that the cluster coexists with
others on a shared machine (private temp dir, per-node ports, small object store).
Everything is stopped by PID (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from teacher_service.api.testing import REPO_ROOT, TEST_TOKEN, encode_image, free_port, random_image

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SERVICES = {"ray-head", "ray-worker", "ray-cpu-worker", "teacher-api", "precompute"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _expand(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` interpolation."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def _command(service: dict, env: dict[str, str]) -> list[str]:
    command = service["command"]
    return [_expand(part, env) for part in command] if isinstance(command, list) else shlex.split(_expand(command, env))


def _distill_argv(argv: list[str]) -> list[str]:
    """`distill ...` as this checkout runs it."""
    assert argv[0] == "distill", argv
    return [sys.executable, "-m", "distillery.cli", *argv[1:]]


# the file itself ------------------------------------------------------------------------
def test_compose_topology(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    assert set(compose["volumes"]) == {"data", "checkpoints", "store"}
    for name, service in services.items():
        assert service["build"]["dockerfile"] == "Dockerfile" and service["image"] == "distillery:latest", name
        assert "container_name" not in service, name  # would forbid --scale

    head = services["ray-head"]
    head_cmd = shlex.split(head["command"])
    assert head_cmd[:3] == ["ray", "start", "--head"] and "--block" in head_cmd and "--port=6379" in head_cmd
    assert head["healthcheck"]["test"] == ["CMD", "ray", "status"]
    assert all(port.startswith("127.0.0.1:") for port in head["ports"])  # GCS/dashboard have no auth

    worker = services["ray-worker"]
    assert shlex.split(worker["command"]) == ["ray", "start", "--address=ray-head:6379", "--block"]
    assert worker["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert "ports" not in worker  # scaled with --scale ray-worker=N
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}

    # CPU-only workers add decode/write capacity (the write stage binds a GPU teacher's job)
    cpu_worker = services["ray-cpu-worker"]
    assert shlex.split(cpu_worker["command"]) == ["ray", "start", "--address=ray-head:6379", "--num-gpus=0", "--block"]
    assert cpu_worker["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert "ports" not in cpu_worker and "deploy" not in cpu_worker

    api = services["teacher-api"]
    api_cmd = shlex.split(api["command"])
    assert api_cmd[:4] == ["distill", "serve", "--host", "0.0.0.0"] and "--token" not in api_cmd
    assert api["environment"]["DISTILLERY_TOKEN"] == "${DISTILLERY_TOKEN:-}"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])

    job = services["precompute"]
    assert job["restart"] == "no"
    assert job["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert "distill precompute --address ray-head:6379" in " ".join(job["command"].split())
    for name in ("ray-head", "ray-worker", "ray-cpu-worker", "precompute"):
        mounts = {m.split(":")[0]: m.split(":")[1] for m in services[name]["volumes"]}
        assert mounts == {"data": "/data", "checkpoints": "/checkpoints", "store": "/store"}, name


def test_compose_commands_parse_with_the_cli(compose):
    """The serve and precompute command lines are valid `distill` invocations."""
    from distillery.cli import build_parser

    parser = build_parser()
    env = {"DISTILLERY_TEACHER_CKPT": "/checkpoints/t.pt"}
    serve = parser.parse_args(_command(compose["services"]["teacher-api"], env)[1:])
    assert (serve.host, serve.port, serve.teacher, serve.max_batch) == ("0.0.0.0", 8000, "/checkpoints/t.pt", 8)
    shell = _command(compose["services"]["precompute"], env)
    assert shell[:2] == ["sh", "-c"]
    join, job = (part.strip() for part in shell[2].split("&&"))
    assert shlex.split(join)[:3] == ["ray", "start", "--address=ray-head:6379"]
    argv = shlex.split(job)
    assert argv[0] == "exec"
    precompute = parser.parse_args(argv[2:])
    assert precompute.address == "ray-head:6379" and precompute.store == "/store/teacher.zarr"
    assert precompute.teacher == "/checkpoints/t.pt"


def test_dockerfile():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    assert "COPY requirements.lock" in text
    assert "pip install -r /app/requirements.lock" in text
    assert "pip install --no-deps -e /app" in text
    assert text.index("pip install -r") < text.index("COPY . /app")  # the dependency layer is cached
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "*.pt" in ignored


def test_compose_config_validates():
    binary = shutil.which("docker-compose")
    if binary is None:
        # The only skip of the suite: the Debian compose binary is a system package, not a pip
        # requirement; .ci/run installs it and validates the same file before the tests.
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose); CI validates it")
    result = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr


# the topology as local processes ---------------------------------------------------------
class _Processes:
    """Started subprocesses, stopped by PID in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.items: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        process = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.items.append((name, process))
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop_all(self) -> dict[str, int | None]:
        codes = {}
        for name, process in reversed(self.items):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
            codes[name] = process.returncode
        return codes


def _pids_with(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (our private Ray temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _wait_for(check, timeout_s: float, what: str, processes: _Processes, names=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        for name, process in processes.items:
            if process.poll() is not None and name in names:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{processes.log(name)}")
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(processes.log(n) for n in names))


def _write_dataset(root: Path, classes: list[str]) -> tuple[Path, Path, dict[int, Path]]:
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    sizes = {1: (40, 50), 2: (64, 30), 3: (48, 48)}
    paths, images, annotations = {}, [], []
    for image_id, (h, w) in sizes.items():
        path = images_dir / f"{image_id:04d}.png"
        path.write_bytes(encode_image(random_image(h, w, seed=image_id)))
        paths[image_id] = path
        images.append({"id": image_id, "file_name": path.name, "height": h, "width": w})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1 + image_id % len(classes),
                            "bbox": [2.0, 3.0, 10.0, 12.0], "area": 120.0, "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    annotation_file = root / "annotations.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotation_file, images_dir, paths


@pytest.mark.slow
@pytest.mark.ray
def test_compose_services_as_local_processes(compose, tmp_path):
    import httpx

    from detcore.images import load_image
    from detcore.views import View, content_hash
    from label_store import open_store
    from label_store.wire import unpack_targets
    from teacher_service.api.testing import make_tiny_teacher, targets_request

    classes = ["c0", "c1", "c2"]
    teacher = make_tiny_teacher(tmp_path / "checkpoints" / "teacher.pt", canvas_hw=(64, 64))
    annotations, images_dir, image_paths = _write_dataset(tmp_path / "data", classes)
    store_url = str(tmp_path / "store" / "teacher.zarr")

    ray_tmp = tempfile.mkdtemp(prefix="dstl-compose-", dir="/tmp")  # short: Ray's socket paths are limited
    gcs_port, api_port = free_port(), free_port()
    compose_env = {
        "DISTILLERY_TEACHER_CKPT": str(teacher), "DISTILLERY_ANNOTATIONS": str(annotations),
        "DISTILLERY_IMAGES": str(images_dir), "DISTILLERY_STORE": store_url, "DISTILLERY_TOKEN": TEST_TOKEN,
        "DISTILLERY_API_DEVICE": "cpu",
    }
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    base_env = {**os.environ, "PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                "TQDM_DISABLE": "1"}
    base_env.pop("RAY_ADDRESS", None)
    # The suite sets it to 0, which refuses `ray start --address` (a second node) on Linux too.
    base_env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    ray_bin = str(Path(sys.executable).with_name("ray"))

    def localize(argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            arg = arg.replace("ray-head:6379", f"127.0.0.1:{gcs_port}").replace("--port=6379", f"--port={gcs_port}")
            arg = arg.replace("--dashboard-host=0.0.0.0", "--dashboard-host=127.0.0.1")
            out.append(arg)
        if out[:2] == ["ray", "start"]:
            out[0] = ray_bin
        return out

    def node_ports() -> list[str]:
        return [f"--node-ip-address=127.0.0.1", f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}", "--object-store-memory=100000000"]

    services = compose["services"]

    def service_env(name: str) -> dict[str, str]:
        environment = services[name].get("environment") or {}
        return {**base_env, **{k: _expand(str(v), compose_env) for k, v in environment.items()}}

    processes = _Processes(tmp_path)
    try:
        head_argv = localize(_command(services["ray-head"], compose_env)) + node_ports() + [
            f"--temp-dir={ray_tmp}", f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}"]
        processes.start("ray-head", head_argv, service_env("ray-head"))
        # The head's healthcheck (`ray status`), pointed at this cluster's GCS.
        status = [ray_bin, *services["ray-head"]["healthcheck"]["test"][2:], f"--address=127.0.0.1:{gcs_port}"]

        def head_healthy() -> bool:
            return subprocess.run(status, env=service_env("ray-head"), capture_output=True, timeout=60).returncode == 0

        _wait_for(head_healthy, 120, "ray-head healthy", processes, ["ray-head"])

        worker_argv = localize(_command(services["ray-worker"], compose_env)) + node_ports()
        processes.start("ray-worker", worker_argv, service_env("ray-worker"))

        api = services["teacher-api"]
        api_env = service_env("teacher-api")
        api_argv = [a.replace("0.0.0.0", "127.0.0.1") for a in _command(api, compose_env)]
        api_argv[api_argv.index("--port") + 1] = str(api_port)
        processes.start("teacher-api", _distill_argv(api_argv), api_env)
        # The API's healthcheck command, with its port.
        health = [a.replace("8000", str(api_port)) for a in api["healthcheck"]["test"][1:]]
        health[0] = sys.executable

        def api_healthy() -> bool:
            return subprocess.run(health, env=base_env, capture_output=True, timeout=30).returncode == 0

        _wait_for(api_healthy, 120, "teacher-api healthy", processes, ["teacher-api"])

        def two_nodes() -> bool:
            result = subprocess.run(status, env=service_env("ray-head"), capture_output=True, text=True, timeout=60)
            return result.returncode == 0 and result.stdout.count(" node_") >= 2

        _wait_for(two_nodes, 120, "ray-worker joined", processes, ["ray-worker"])

        # The one-shot job: the `distill precompute` half of its shell command. Its first half
        # (`ray start --address=ray-head:6379 --num-cpus=0 ...`) makes a container a Ray node so
        # that a driver can run there; this host already is one.
        shell = _command(services["precompute"], compose_env)
        job = shlex.split(shell[2].split("&&")[1].strip())
        assert job[0] == "exec"
        precompute = subprocess.run(
            _distill_argv(localize(job[1:])), env=service_env("precompute"), cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=420,
        )
        assert precompute.returncode == 0, precompute.stdout[-3000:] + precompute.stderr[-3000:]

        reader = open_store(store_url)
        keys = sorted(reader.keys())
        assert len(keys) == 6  # 3 images x {original, flip}
        headers = {"Authorization": f"Bearer {TEST_TOKEN}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=120) as client:
            assert client.get("/v1/teacher").status_code == 401
            info = client.get("/v1/teacher", headers=headers).json()
            assert info["fingerprint"] == reader.fingerprint.to_dict()
            views = [View.from_json(reader.record(*key)["view"]) for key in keys]
            blobs = [image_paths[v.image_id].read_bytes() for v in views]
            names = ",".join(sorted({s.name.split("/")[0] for s in reader.targets}))
            data, files = targets_request(views, blobs, targets=names)
            response = client.post("/v1/targets", data=data, files=files, headers=headers)
        assert response.status_code == 200, response.text
        fingerprint, specs, entries = unpack_targets(response.content)
        assert fingerprint == reader.fingerprint.to_dict()
        # The same targets; a group the store keeps transform-coded (a basis fitted on the store's
        # first views) is served with the basis-free codec of its group.
        stored_specs = {s.name: s for s in reader.targets}
        assert [(s.name, s.shape) for s in specs] == [(s.name, s.shape) for s in reader.targets]
        for spec in specs:
            if not stored_specs[spec.name].target_codec.needs_basis:
                assert spec.to_dict() == stored_specs[spec.name].to_dict()
        for key, entry in zip(keys, entries):
            assert (entry["image_id"], entry["view_id"]) == key
            record = reader.record(*key)
            assert entry["content_hash"] == record["content_hash"]
            assert entry["content_hash"] == content_hash(load_image(image_paths[key[0]]))
            stored = reader.read(*key)
            for spec in specs:
                # Different batch compositions round a few values to the neighbouring code.
                got, want = entry["targets"][spec.name], stored[spec.name]
                _, scale, _ = spec.target_codec.encode(want)
                step = float(scale.max()) if scale.size else 0.0
                store_codec = stored_specs[spec.name].target_codec
                if store_codec.needs_basis:  # two codecs: the served step plus the store's own bound
                    _, store_scale, _ = store_codec.encode(want)
                    bound = float(store_codec.error_bound(want, store_scale).max())
                    assert np.abs(got - want).max() <= 1.01 * (step + bound) + 1e-5, spec.name
                    continue
                assert np.abs(got - want).max() <= 1.01 * step + 1e-5, spec.name
                assert np.mean(got == want) >= 0.95, spec.name
    finally:
        codes = processes.stop_all()
        deadline = time.monotonic() + 30
        while _pids_with(ray_tmp) and time.monotonic() < deadline:
            time.sleep(1)
        leftovers = _pids_with(ray_tmp)
        for pid in leftovers:  # stragglers of this cluster only, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert codes["teacher-api"] in (0, 143, -15), processes.log("teacher-api")
    assert leftovers == [], f"processes of the local cluster left after SIGTERM: {leftovers}"
