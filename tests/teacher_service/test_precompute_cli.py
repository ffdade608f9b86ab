"""`distill precompute` (`teacher_service.cli`): bad input exits 2 before Ray starts; no inputs use the built-in default.
"""

from __future__ import annotations

import argparse

import pytest

from precompute_fixtures import (  # noqa: F401  (fixtures are found by name)
    _cli,
    _shutdown_ray_after_module,
    data,
)


def test_cli_bad_input_exits_2_before_starting_ray(data, tmp_path, capsys):
    import ray

    common = ["--images", str(data["images"]), "--teacher", str(data["teacher"]), "--store", str(tmp_path / "s.zarr")]
    assert _cli(["precompute", "--annotations", str(tmp_path / "missing.json"), *common]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert _cli(["precompute", "--annotations", str(data["annotations"]), "--images", str(data["images"])]) == 2
    assert "Missing: --teacher" in capsys.readouterr().err
    assert _cli(["precompute", "--annotations", str(data["annotations"]), *common, "--codec", "fpn=int9-view"]) == 2
    assert "int9-view" in capsys.readouterr().err
    assert _cli(["precompute", "--annotations", str(data["annotations"]), *common, "--views-per-image", "2"]) == 2
    assert "--scale-range" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _cli(["precompute", "--annotations", str(data["annotations"]), *common, "--scale-range", "0.9:0.5"])
    assert exit_info.value.code == 2 and "--scale-range expects LO:HI" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_cli_unknown_codec_profile_exits_2_naming_the_flag(data, tmp_path, capsys):
    common = ["--annotations", str(data["annotations"]), "--images", str(data["images"]), "--teacher", str(data["teacher"])]
    with pytest.raises(SystemExit) as exit_info:
        _cli(["precompute", *common, "--store", str(tmp_path / "s.zarr"), "--codec-profile", "tiny"])
    assert exit_info.value.code == 2
    assert "--codec-profile" in capsys.readouterr().err


def test_cli_without_inputs_uses_the_quickstart_store_views_and_targets(data, tmp_path, monkeypatch):
    from detcore import defaults
    from teacher_service import cli

    calls = []
    monkeypatch.setattr(defaults, "ensure_default_dataset", lambda preset: calls.append(preset.name) or (
        data["annotations"], data["images"], tmp_path / "val.json", tmp_path / "val"))
    monkeypatch.setattr(defaults, "ensure_default_teacher", lambda preset: data["teacher"])
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    parser = argparse.ArgumentParser(prog="distill")
    cli.register(parser.add_subparsers(dest="command"))

    inputs = cli._resolve_inputs(parser.parse_args(["precompute"]))

    assert calls == ["quick"]
    assert (inputs.annotations, inputs.teacher) == (str(data["annotations"]), str(data["teacher"]))
    assert inputs.store == str(tmp_path / "home" / "stores" / "quick-easy-gfl_r18.zarr")
    assert inputs.targets == ("cls", "box", "fpn", "backbone")
    assert inputs.scales == tuple(defaults.PRESETS["quick"].scales)
    explicit = cli._resolve_inputs(parser.parse_args(["precompute", "--targets", "cls", "--scales", "0.5"]))
    assert (explicit.targets, explicit.scales) == (("cls",), (0.5,))
