"""The run config: one builder, file < flags < --set, strict keys, round trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from student_trainer.config import (
    LOSS_TERMS,
    ConfigError,
    LossConfig,
    TrainRunConfig,
    build_run_config,
    config_from_dict,
    parse_losses,
)

BASE = {"annotations": "train.json", "images": "train", "store": "s.zarr"}


def test_parse_losses_groups_and_terms():
    assert parse_losses("ld") == ("ld_main", "ld_vlr", "ld_kd")
    assert parse_losses("fgd,ld_kd") == ("ld_kd", "fgd")
    assert parse_losses("ld+fgd") == ("ld_main", "ld_vlr", "ld_kd", "fgd")
    assert parse_losses("none") == ()
    assert parse_losses("") == ()
    assert len(parse_losses("all")) == 6  # the four methods; LD's optional imitation is asked for by name
    assert parse_losses("ld,ld_im") == ("ld_main", "ld_vlr", "ld_kd", "ld_im")
    assert LossConfig(enabled=parse_losses("ld,ld_im")).target_groups == ("cls", "box", "fpn")
    assert LossConfig(enabled=("ld_im",)).target_groups == ("fpn",)
    with pytest.raises(ConfigError, match="'ldd'"):
        parse_losses("ldd")


def test_defaults_are_the_papers_recipes():
    config = build_run_config(None, BASE)
    assert config.losses.enabled == ("ld_main", "ld_vlr", "ld_kd")
    assert config.losses.ld.main_weight == 0.25 and config.losses.ld.kd_weight == 10.0
    assert config.losses.ld.main_temperature == 10.0 and config.losses.ld.kd_temperature == 2.0
    assert config.losses.bcd.iou_weight == 4.0
    assert config.losses.fgd.alpha == 1e-3 and config.losses.fgd.lambda_ == 5e-6
    assert config.source.kind == "store"
    assert config.data.photometric is False and config.approximations == []


def test_file_then_flags_then_sets(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({
        "data": BASE,
        "optim": {"epochs": 3, "lr": 0.01},
        "losses": {"enabled": "ld,fgd", "fgd": {"alpha": 0.002}},
    }))
    config = build_run_config(path, {"lr": 0.005, "batch_size": 4}, ["losses.fgd.beta=1e-4", "optim.epochs=7"])
    assert config.optim.lr == 0.005 and config.optim.batch_size == 4 and config.optim.epochs == 7
    assert config.losses.enabled == ("ld_main", "ld_vlr", "ld_kd", "fgd")
    assert config.losses.fgd.alpha == 0.002 and config.losses.fgd.beta == 1e-4
    assert config.losses.fgd.gamma == 5e-4  # untouched default


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  annotations: a.json\n  images: imgs\n  store: s.zarr\n  canvas: [96, 128]\nlosses:\n  enabled: [bcd, hgd]\n")
    config = build_run_config(path)
    assert config.data.canvas == (96, 128)
    assert config.losses.enabled == ("bcd", "hgd")
    assert config.losses.target_groups == ("cls", "box", "fpn", "backbone")


def test_round_trip_through_dict():
    config = build_run_config(None, {**BASE, "losses": "ld,bcd,fgd,hgd", "canvas": "64x96"}, ["losses.hgd.stages=c4,p3"])
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.losses.hgd.stages == ("c4", "p3")
    assert again.data.canvas == (64, 96)


@pytest.mark.parametrize(
    "overrides, sets, message",
    [
        ({}, ["losses.fgd.alhpa=1"], "losses.fgd.alhpa"),
        ({}, ["optim.epochs=two"], "optim.epochs"),
        ({"source": "remote"}, [], "source.endpoint"),
        ({"source": "inprocess"}, [], "source.teacher"),
        ({"source": "carrier-pigeon"}, [], "source.kind"),
        ({"epochs": 0}, [], "optim.epochs"),
        ({"val_annotations": "v.json"}, [], "val_images"),
        ({}, ["losses.ld.avg_factor_images=-2"], "losses.ld.avg_factor_images"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(overrides, sets, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_run_config(None, {**BASE, **overrides}, sets)


def test_photometric_is_recorded_as_an_approximation():
    config = build_run_config(None, {**BASE, "photometric": True})
    assert isinstance(config, TrainRunConfig)
    assert len(config.approximations) == 1 and "photometric" in config.approximations[0]


def test_config_builds_and_round_trips_without_torch(tmp_path):
    """Building, checking and writing a run config (every loss recipe included) loads no torch."""
    code = (
        "import sys, json\n"
        "from student_trainer.config import build_run_config, config_from_dict\n"
        f"config = build_run_config(None, {{**{BASE!r}, 'losses': 'all,ld_im'}}, ['losses.fgd.alpha=2e-3'])\n"
        "assert config_from_dict(json.loads(config.to_json())) == config\n"
        "print(','.join(config.losses.groups_read()))\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    repo_root = str(Path(__file__).resolve().parents[2])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo_root),
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cls,box,fpn,backbone"


def test_one_table_says_which_term_reads_which_group():
    from label_store.schema import LOSS_TARGET_GROUPS

    assert LOSS_TERMS == tuple(LOSS_TARGET_GROUPS)
    for term in LOSS_TERMS:
        assert LossConfig(enabled=(term,)).target_groups == LOSS_TARGET_GROUPS[term]
    bcd = LossConfig(enabled=("ld_kd", "bcd"))
    assert bcd.groups_read({"cls", "edges", "fpn"}) == ("cls", "box", "edges")  # LD still asks for box: the store must hold it
    assert LossConfig(enabled=("bcd",)).groups_read({"cls", "edges"}) == ("cls", "edges")
    assert LossConfig(enabled=("bcd",)).groups_read({"cls", "box", "edges"}) == ("cls", "box")
    assert build_run_config(None, BASE, ["losses.enabled=hgd", "losses.hgd.stages=c4,c5"]).losses.target_groups == ("backbone",)
