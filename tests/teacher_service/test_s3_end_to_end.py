"""`distill precompute` and `distill train` on an S3 store: an S3-compatible server (moto) on loopback.

The commands run as subprocesses, as a user runs them: the Ray write tasks of the job and
the trainer's DataLoader workers reach the bucket with credentials from the environment,
and the endpoint comes from ``--storage-option``. The credentials' values must appear
nowhere: not on stdout or stderr, not in the bucket (manifest, schema, parts), not in the
run's files, not in the log files of the Ray cluster.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from label_store import open_store
from label_store.maintenance import verify_store
from process_signals import distill_env
from precompute_fixtures import _write_dataset, _write_teacher

pytestmark = pytest.mark.slow
BUCKET = "distillery-e2e"
NUM_VIEWS = 16  # 8 images x {original, flip}


@pytest.fixture(scope="module")
def s3():
    """``(endpoint URL, boto3 client)`` of a moto server on 127.0.0.1 with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


def _bucket_bytes(client, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    return out


def _files_containing(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(n.encode() in data for n in needles):
                found.append(str(path))
    return found


def test_precompute_and_train_on_an_s3_store_with_credentials_from_the_environment(s3, tmp_path):
    endpoint, client = s3
    annotations, images = _write_dataset(tmp_path / "data")
    teacher = _write_teacher(tmp_path / "teacher.pt")
    key_id, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    ray_tmp = Path(tempfile.mkdtemp(prefix="dray-"))  # short: Ray's socket paths must fit 107 bytes
    env = distill_env(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
                      RAY_TMPDIR=str(ray_tmp))
    store = f"s3://{BUCKET}/runs/t.zarr"
    option = ["--storage-option", f"endpoint_url={endpoint}"]
    try:
        precompute = subprocess.run(
            [sys.executable, "-m", "distillery.cli", "precompute", "--annotations", str(annotations), "--images",
             str(images), "--teacher", str(teacher), "--store", store, *option, "--batch-size", "4",
             "--views-per-part", "4", "--cpus-per-actor", "0.5", "--cpus-per-task", "0.5", "--torch-threads", "1",
             "--num-cpus", "2", "--no-progress"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert precompute.returncode == 0, precompute.stderr[-3000:]
        assert f"stored                       {NUM_VIEWS} in 4 part(s)" in precompute.stdout
        ray_logs_with_secrets = _files_containing(ray_tmp, [key_id, secret])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    read_options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    report = verify_store(store, storage_options=read_options)
    assert report.ok and report.parts == 4 and report.checked_views == NUM_VIEWS
    assert len(open_store(store, storage_options=read_options).keys()) == NUM_VIEWS

    out = tmp_path / "student"
    train = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "train", "--store", store, *option, "--annotations", str(annotations),
         "--images", str(images), "--student", "gfl_tiny", "--losses", "ld", "--iters", "2", "--batch-size", "2",
         "--num-workers", "1", "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out),
         "--set", "student.fpn_channels=16", "--set", "student.head_channels=16", "--set", "schedule.tensorboard=false"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 2 and results["source"]["store"] == store
    assert json.loads((out / "run_config.json").read_text())["data"]["storage_options"] == [["endpoint_url", endpoint]]

    for text in (precompute.stdout, precompute.stderr, train.stdout, train.stderr):
        assert key_id not in text and secret not in text
    stored = _bucket_bytes(client, "runs/")
    assert any(key.endswith(".parquet") for key in stored) and any(key.endswith("zarr.json") for key in stored)
    assert [key for key, data in stored.items() if key_id.encode() in data or secret.encode() in data] == []
    assert _files_containing(out, [key_id, secret]) == []
    assert ray_logs_with_secrets == []


def test_run_records_leave_out_the_token_and_secret_storage_options():
    from student_trainer.config import REDACTED, build_run_config

    config = build_run_config(None, {
        "store": "s3://b/t.zarr", "annotations": "a.json", "images": "images", "token": "tok-0123456789abcdef",
        "storage_option": [("endpoint_url", "http://127.0.0.1:9000"), ("secret", "s3cr3t"), ("anon", False)],
    })
    assert config.data.storage_options[1] == ("secret", "s3cr3t")  # the run itself uses them
    record = config.to_record()
    assert record["source"]["token"] == REDACTED
    assert record["data"]["storage_options"] == [["endpoint_url", "http://127.0.0.1:9000"], ["secret", REDACTED],
                                                 ["anon", False]]
    assert "s3cr3t" not in json.dumps(record) and "tok-0123456789abcdef" not in json.dumps(record)
