"""Precompute throughput (views/s) on one Ray node and on two.

Two ways of making the nodes, both on this one machine:

- ``cluster_utils``: `ray.cluster_utils.Cluster` (head node, then `add_node`), driven by
  `run_precompute` in this process;
- ``ray_start``: two ``ray start --block`` processes on loopback (head, then a worker
  joining it) with explicit ports and ``--temp-dir``, driven by the real CLI
  (``distill precompute --address 127.0.0.1:PORT``) in a subprocess. They are stopped by
  terminating their own process trees by PID (never ``ray stop``, which would stop
  every Ray instance of the machine).

Every node gets ``--cpus-per-node`` logical CPUs and runs one teacher actor with one torch
thread; views/s counts committed views over the job's wall time without the cluster
start or connect. The nodes share this machine's cores, so two nodes can only show
what the pipeline gains from a second actor on the same cores, not real scale-out.

    python benchmarks/precompute_scaling.py --num-images 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from precompute_overhead import prepare  # noqa: E402


def _job_args(paths: dict[str, Path], store: Path, args: argparse.Namespace, num_actors: int) -> dict:
    return {
        "annotations": str(paths["annotations"]),
        "images_dir": str(paths["images"]),
        "teacher": str(paths["teacher"]),
        "store": str(store),
        "canvas_hw": (args.canvas, args.canvas),
        "batch_size": args.batch_size,
        "num_actors": num_actors,
        "cpus_per_actor": 1.0,
        "cpus_per_task": 0.5,
        "torch_threads": 1,
        "show_progress": False,
    }


def _result(mode: str, nodes: int, summary: dict, load_before, load_after) -> dict:
    job_seconds = summary["seconds"] - summary["ray_init_seconds"]
    return {
        "mode": mode,
        "nodes": nodes,
        "views_stored": summary["views_stored"],
        "views_failed": summary["views_failed"],
        "job_seconds": job_seconds,
        "views_per_second": summary["views_stored"] / job_seconds,
        "stage_worker_seconds": {k: summary[f"{k}_seconds"] for k in ("decode", "forward", "encode", "write")},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def run_cluster_utils(paths, args, nodes: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from teacher_service.precompute import PrecomputeConfig, run_precompute

    store = args.work / f"scaling-cu-{nodes}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        alive = len([n for n in ray.nodes() if n["Alive"]])
        if alive != nodes:
            raise RuntimeError(f"run_cluster_utils expects {nodes} live nodes. Got {alive}.")
        load_before = os.getloadavg()
        summary = run_precompute(PrecomputeConfig(**_job_args(paths, store, args, num_actors=nodes))).to_dict()
        return _result("cluster_utils", nodes, summary, load_before, os.getloadavg())
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports(base: int) -> list[str]:
    """Distinct ports for one raylet (several nodes share 127.0.0.1)."""
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--min-worker-port={base}",
        f"--max-worker-port={base + 99}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]


def _start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _session_pids(session_id: int) -> list[int]:
    """PIDs of the live processes in one session (Linux /proc): a `ray start` and all it spawned."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session_id:
            pids.append(int(entry.name))
    return pids


def _stop(process: subprocess.Popen) -> int:
    """Terminate one `ray start --block` (its own session) and every process it started, by PID.

    Returns how many processes had to be killed with SIGKILL after the grace period.
    """
    process.send_signal(signal.SIGTERM)  # `ray start --block` drains, then stops its processes
    try:
        process.wait(timeout=45)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 15
    while _session_pids(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _session_pids(process.pid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def run_ray_start(paths, args, nodes: int) -> dict:
    ray = str(Path(sys.executable).parent / "ray")
    temp_dir = Path(f"/tmp/dpc-raystart-{os.getpid()}")  # short: Ray's socket paths have a length limit
    shutil.rmtree(temp_dir, ignore_errors=True)
    # A private HOME gives these processes their own ~/.ray/auth_token: the default one is
    # shared with every other Ray user of the machine, and a concurrent rewrite locks us out.
    home = temp_dir.with_name(temp_dir.name + "-home")
    home.mkdir(parents=True, exist_ok=True)
    # `ray start` refuses to join a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    # (the project's default, against accidental clusters); this benchmark wants one.
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    port = _free_port()
    common = [f"--num-cpus={args.cpus_per_node}", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block"]
    processes = []
    store = args.work / f"scaling-rs-{nodes}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    try:
        processes.append(
            _start(
                [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                 f"--ray-client-server-port={_free_port()}", *_node_ports(20000), *common],
                args.work / "ray-start-head.log", env,
            )
        )
        for index in range(1, nodes):
            processes.append(
                _start(
                    [ray, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                     *_node_ports(20000 + 100 * index), *common],
                    args.work / f"ray-start-worker{index}.log", env,
                )
            )
        _wait_for_nodes(f"127.0.0.1:{port}", nodes, env)
        summary_path = args.work / f"scaling-rs-{nodes}.json"
        job = _job_args(paths, store, args, num_actors=nodes)
        argv = [
            sys.executable, "-m", "distillery.cli", "precompute",
            "--annotations", job["annotations"], "--images", job["images_dir"], "--teacher", job["teacher"],
            "--store", job["store"], "--canvas", f"{args.canvas}x{args.canvas}", "--batch-size", str(args.batch_size),
            "--num-actors", str(nodes), "--cpus-per-actor", "1", "--torch-threads", "1",
            "--address", f"127.0.0.1:{port}", "--no-progress", "--summary-json", str(summary_path),
        ]
        load_before = os.getloadavg()
        completed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
        if completed.returncode != 0:
            raise RuntimeError(f"distill precompute failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
        summary = json.loads(summary_path.read_text())
        return _result("ray_start", nodes, summary, load_before, os.getloadavg())
    finally:
        left = sum(_stop(p) for p in reversed(processes))
        if left:
            print(f"warning: {left} Ray process(es) needed SIGKILL", file=sys.stderr)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _wait_for_nodes(address: str, nodes: int, env: dict, timeout: float = 120.0) -> None:
    code = (
        "import ray, sys\n"
        f"ray.init(address={address!r}, log_to_driver=False)\n"
        "print(len([n for n in ray.nodes() if n['Alive']]))\n"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(nodes)]:
            return
        time.sleep(2)
    raise TimeoutError(f"_wait_for_nodes expects {nodes} live nodes at {address} within {timeout:.0f} s. Got fewer.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64, help="synthetic images (2 views each)")
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--modes", default="cluster_utils,ray_start")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distillery-bench-precompute"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TMPDIR", str(args.work / "ray"))
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.num_images, args.canvas)

    results = []
    for mode in args.modes.split(","):
        for nodes in (1, 2):
            run = run_cluster_utils if mode == "cluster_utils" else run_ray_start
            result = run(paths, args, nodes)
            results.append(result)
            print(
                f"{mode:13s} nodes={nodes}: {result['views_stored']} views in {result['job_seconds']:.1f} s = "
                f"{result['views_per_second']:.2f} views/s (failed {result['views_failed']}); "
                f"load {result['loadavg_before'][0]:.1f} -> {result['loadavg_after'][0]:.1f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
