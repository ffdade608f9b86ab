"""Fixtures for the label_store tests: a tiny teacher, and the local and S3 (moto) backends."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from label_store import TeacherFingerprint, default_target_specs
from label_store.testing import synthetic_targets

CANVAS = (64, 48)
STRIDES = (8, 16, 32)
NUM_CLASSES = 3
REG_MAX = 7
FPN_CHANNELS = 16
S3_OPTIONS_BASE = {"key": "testing", "secret": "testing", "anon": False}


@pytest.fixture
def fingerprint() -> TeacherFingerprint:
    return TeacherFingerprint(
        architecture="gfl_tiny",
        checkpoint_sha256="ab" * 32,
        classes=("person", "car", "dog"),
        canvas_hw=CANVAS,
        strides=STRIDES,
        reg_max=REG_MAX,
        preprocessing={"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
    )


@pytest.fixture
def specs():
    return default_target_specs(NUM_CLASSES, REG_MAX, CANVAS, STRIDES, FPN_CHANNELS)


def _make_record(image_id: int, view_id: int = 0) -> dict:
    return {
        "image_id": image_id,
        "view_id": view_id,
        "view": json.dumps({"image_id": image_id, "view_id": view_id, "scale": 0.5, "flip": bool(view_id % 2)}),
        "content_hash": f"hash-{image_id}",
        "valid_region": (0, 0, CANVAS[1], CANVAS[0] - 8),
    }


def _make_targets(specs, image_id: int, view_id: int = 0) -> dict:
    return synthetic_targets(specs, seed=image_id * 1000 + view_id)


@pytest.fixture
def make_record():
    """make_record(image_id, view_id=0) -> a valid per-view record."""
    return _make_record


@pytest.fixture
def make_targets():
    """make_targets(specs, image_id, view_id=0) -> teacher-like targets, the same for the same key."""
    return _make_targets


@pytest.fixture(scope="session")
def moto_s3():
    """An S3-compatible server (moto) on loopback, with one bucket; yields storage options."""
    import boto3  # in requirements.lock: a missing one must fail, not skip
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).create_bucket(Bucket="label-store-tests")
    yield {**S3_OPTIONS_BASE, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(url, storage_options) of a fresh store location on each backend."""
    if request.param == "local":
        return str(tmp_path / "store.zarr"), {}
    options = request.getfixturevalue("moto_s3")
    return f"s3://label-store-tests/{uuid.uuid4().hex}/store.zarr", options
