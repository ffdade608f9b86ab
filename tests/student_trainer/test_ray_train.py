"""Ray Train on a local 2-CPU cluster (gloo): ranks in step, 2 workers equal to 1 with the same global batch, resume after a kill."""

import dataclasses
import json
import os
import tempfile

import pytest
import torch

from student_fixtures import run_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_two_worker_ray_train_run(world, tmp_path, monkeypatch):
    import ray

    from detcore.checkpoint import load_detector_with_meta
    from student_trainer.ray_train import train_with_ray

    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="st-ray-"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    assert not ray.is_initialized()
    out = tmp_path / "run"
    config = run_config(world, out, losses="ld,fgd", iters=2, ray_workers=2)
    summary = train_with_ray(config, num_cpus=2)
    assert not ray.is_initialized()  # it shut down the cluster it started

    assert summary["finished"] and summary["world_size"] == 2 and summary["step"] == 2
    # 4 images over 2 workers with batch 2 each: one step is one epoch
    assert summary["iters_per_epoch"] == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # written by rank 0 only
    assert all(line["fgd"] > 0 and line["ld_kd"] >= 0 for line in lines)
    model, meta = load_detector_with_meta(out / "final.pt")
    assert meta["classes"] == ("square", "disc")
    final = torch.load(out / "final.pt", weights_only=True)
    assert any(k.startswith("fgd.") for k in final["training"]["distill_state"])
    checkpoints = [p for p in (out / "ray").rglob("last.pt")]
    assert checkpoints  # rank 0 reported last.pt to Ray Train at the epoch ends
    assert os.path.getsize(checkpoints[0]) > 0
    # DDP kept the ranks in step: bit-identical parameters on both after the last step
    assert len(summary["parameter_digests"]) == 2 and len(set(summary["parameter_digests"])) == 1


def _student_parameters(path):
    state = torch.load(path, weights_only=True)["model_state"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point() and "running_" not in k}


def _paired_world(world, root):
    """4 training images that are 2 pictures twice (ids 1, 3 and 2, 4), and a store of their original views."""
    import shutil

    from student_fixtures import write_coco, write_store

    source = write_coco(root / "pictures", 2, seed=5)
    document = json.loads(source.read_text())
    images_dir = root / "train"
    images_dir.mkdir()
    images, annotations = [], []
    for copy in range(2):
        for picture in document["images"]:
            image_id = picture["id"] + 2 * copy
            name = f"{image_id:04d}.png"
            shutil.copy(root / "pictures" / picture["file_name"], images_dir / name)
            images.append({**picture, "id": image_id, "file_name": name})
            for row in document["annotations"]:
                if row["image_id"] == picture["id"]:
                    annotations.append({**row, "id": len(annotations) + 1, "image_id": image_id})
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": document["categories"]}))
    store = write_store(root / "store.zarr", world.teacher, path, images_dir, flip=False)
    return path, images_dir, store


def _seed_pairing_the_ranks(views, epochs):
    """A data seed for which, every epoch, each of 2 ranks gets one copy of each picture (image ids mod 2)."""
    from detcore.datasets import CanvasBatchSampler

    for seed in range(1000):
        ranks = [CanvasBatchSampler(views, 2, seed=seed, num_replicas=2, rank=r) for r in range(2)]
        if all(
            sorted(views[i].image_id % 2 for batch in rank.batches(epoch) for i in batch) == [0, 1]
            for epoch in range(epochs) for rank in ranks
        ):
            return seed
    raise AssertionError("no seed pairs the ranks")


def test_two_workers_match_one_worker_with_the_same_global_batch(world, tmp_path, monkeypatch):
    """2 workers x batch 2 against 1 worker x batch 4: same views per step, same starting weights.

    Both runs see the same 4 views at every step (rank r takes positions r, r+2 of the one
    seeded order; no dropout, no photometric jitter, SGD without warm-up). Three things make
    a data-parallel step differ from one big batch in general: BatchNorm normalizes with
    each rank's own statistics; each rank normalizes its losses by its own positives before
    DDP averages the gradients; and GFL's box-loss normaliser (the positives' scores) is
    clamped at 1 per rank, so while scores are small the DFL and GIoU terms are sums over
    the rank's batch. Here the 4 images are 2 pictures twice, the seed gives each rank one
    copy of each, and the student starts with its class scores near 0.9 (class bias 2):
    all three are then the same on every rank as on the global batch, and the runs may
    differ only by float32 summation order (other conv batch sizes, the all-reduce), about
    1e-6 of the update per step. The tolerance is 1e-4 of the update; a wrong sharding
    (other views) or summed instead of averaged gradients differ by O(1).
    """
    from detcore.checkpoint import save_checkpoint
    from detcore.models.gfl import build_detector
    from student_trainer.ray_train import train_with_ray
    from student_trainer.sources import StoreSource

    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="st-ray-"))
    annotations, images, store = _paired_world(world, tmp_path)
    views = sorted((view for view, _ in StoreSource(str(store), []).stored_views()), key=lambda v: v.key)
    seed = _seed_pairing_the_ranks(views, epochs=2)
    torch.manual_seed(seed)
    student = build_detector("gfl_tiny", 2, fpn_channels=16, head_channels=16)
    with torch.no_grad():
        student.head.cls_conv.bias.fill_(2.0)
    init = save_checkpoint(tmp_path / "init.pt", student, classes=["square", "disc"], canvas_hw=(64, 64))
    start = {k: v.double() for k, v in student.state_dict().items()}
    common = dict(losses="ld,fgd", iters=2, optimizer="sgd", lr=0.01, checkpoint_every=100, seed=seed, store=store,
                  student_init=str(init))

    def config(out, **extra):
        built = run_config(world, out, **common, **extra)
        return dataclasses.replace(built, data=dataclasses.replace(built.data, annotations=str(annotations), images=str(images)))

    one = train_with_ray(config(tmp_path / "one", batch_size=4, ray_workers=1), num_cpus=2)
    two = train_with_ray(config(tmp_path / "two", batch_size=2, ray_workers=2), num_cpus=2)
    assert one["step"] == two["step"] == 2 and one["iters_per_epoch"] == two["iters_per_epoch"] == 1
    assert len(set(two["parameter_digests"])) == 1

    after_one, after_two = _student_parameters(tmp_path / "one" / "final.pt"), _student_parameters(tmp_path / "two" / "final.pt")
    update_one = torch.cat([(after_one[k] - start[k]).flatten() for k in after_one])
    update_two = torch.cat([(after_two[k] - start[k]).flatten() for k in after_one])
    assert update_one.norm() > 0
    relative = float((update_two - update_one).norm() / update_one.norm())
    assert relative < 1e-4, relative


_DRIVER = """
import json, sys
from student_trainer.config import config_from_dict
from student_trainer.ray_train import train_with_ray
train_with_ray(config_from_dict(json.loads(open(sys.argv[1]).read())), num_cpus=2)
"""


def _descendants(root_pid):
    """Pids of every live process below ``root_pid`` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _driver_run(world, tmp_path, monkeypatch):
    """A 30-step, 2-worker run checkpointing every step, for a driver process of its own: the
    repository root, the run folder, its config, the config's JSON file and the driver's environment."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    ray_tmp = tempfile.mkdtemp(prefix="st-ray-")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    out = tmp_path / "run"
    config = run_config(world, out, losses="ld", iters=30, batch_size=1, ray_workers=2, checkpoint_every=1)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    return repo, out, config, config_path, env


def test_a_killed_ray_train_run_resumes_from_its_last_checkpoint(world, tmp_path, monkeypatch):
    """SIGKILL a Ray Train worker once a checkpoint exists; the run fails; re-running continues from that step."""
    import signal
    import subprocess
    import sys
    import time

    from student_trainer.ray_train import train_with_ray

    repo, out, config, config_path, env = _driver_run(world, tmp_path, monkeypatch)
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(config_path)], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            last = out / "last.pt"
            if last.exists() and torch.load(last, weights_only=True)["training"]["step"] >= 2:
                workers = [pid for pid in _descendants(driver.pid) if "RayTrainWorker" in _cmdline(pid)]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = workers[0]
                    break
            time.sleep(0.05)  # polling the checkpoint file the run writes
        assert killed is not None, (tmp_path / "driver.log").read_text()[-3000:]
        assert driver.wait(timeout=180) != 0  # the run failed with its worker
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    checkpoint_step = torch.load(out / "last.pt", weights_only=True)["training"]["step"]
    assert 2 <= checkpoint_step < 30
    assert not (out / "final.pt").exists()

    summary = train_with_ray(config, num_cpus=2)  # the same command again
    assert summary["finished"] and summary["step"] == 30
    assert summary["resumed_from_step"] == checkpoint_step
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # each step logged once: nothing redone twice, nothing skipped
    assert len(set(summary["parameter_digests"])) == 1


_CLI_DRIVER = """
import json, sys
from detcore.interrupt import Interrupted
from student_trainer.config import config_from_dict
from student_trainer.ray_train import train_with_ray
try:
    train_with_ray(config_from_dict(json.loads(open(sys.argv[1]).read())), num_cpus=2)
except Interrupted as stop:  # as `distill train` ends an interrupted run
    sys.exit(stop.report())
"""


def test_ctrl_c_stops_a_ray_train_run_with_130_and_the_same_command_resumes(world, tmp_path, monkeypatch):
    """SIGINT to the driver's process group (a terminal's Ctrl-C) once a checkpoint exists: exit 130 naming
    the step last.pt holds, Ray shut down; re-running continues from that step."""
    import signal
    import subprocess
    import sys
    import time

    from student_trainer.ray_train import train_with_ray

    repo, out, config, config_path, env = _driver_run(world, tmp_path, monkeypatch)
    driver = subprocess.Popen([sys.executable, "-c", _CLI_DRIVER, str(config_path)], cwd=repo, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            last = out / "last.pt"
            if last.exists() and torch.load(last, weights_only=True)["training"]["step"] >= 2:
                break
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0][-3000:]
            time.sleep(0.05)  # polling the checkpoint file the run writes
        os.killpg(driver.pid, signal.SIGINT)
        output = driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.communicate()
    checkpoint_step = torch.load(out / "last.pt", weights_only=True)["training"]["step"]
    assert driver.returncode == 130, output[-3000:]
    assert f"interrupted by SIGINT: {out / 'last.pt'} holds step {checkpoint_step}" in output
    assert 2 <= checkpoint_step < 30 and not (out / "final.pt").exists()
    assert not [pid for pid in _descendants(driver.pid) if "raylet" in _cmdline(pid)]

    summary = train_with_ray(config, num_cpus=2)  # the same command again
    assert summary["finished"] and summary["step"] == 30
    assert summary["resumed_from_step"] == checkpoint_step
    assert len(set(summary["parameter_digests"])) == 1
