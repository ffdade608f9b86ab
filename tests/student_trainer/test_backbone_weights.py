"""`distill train --backbone-weights`: a ResNet student starts from a user's state_dict, frozen as mmdetection does."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    gen = torch.Generator().manual_seed(4)
    for module in reference.modules():  # non-trivial statistics, so that an update would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return path, {k: v.clone() for k, v in reference.state_dict().items()}


def _student_key(torchvision_key):
    for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if torchvision_key.startswith(old):
            return "backbone." + new + torchvision_key[len(old):]
    return "backbone." + torchvision_key


def _train(world, out, weights, *extra):
    from distillery.cli import main

    args = ["train", "--store", str(world.store), "--annotations", str(world.annotations), "--images", str(world.images),
            "--student", "gfl_r18", "--backbone-weights", str(weights), "--out", str(out), "--batch-size", "2",
            "--num-workers", "0", "--threads", "1", "--device", "cpu", "--no-progress", "--iters", "2", "--lr", "0.01",
            "--losses", "ld", "--set", "student.fpn_channels=16", "--set", "student.head_channels=16",
            "--set", "schedule.tensorboard=false", *extra]
    assert main(args) == 0
    return torch.load(out / "final.pt", map_location="cpu", weights_only=True)["model_state"]


def test_weights_loaded_stem_and_first_stage_frozen_bn_statistics_kept(world, tmp_path, resnet18_file):
    path, reference = resnet18_file
    state = _train(world, tmp_path / "run", path)
    stats = [k for k in reference if k.endswith(("running_mean", "running_var"))]
    frozen = [k for k in reference if k.startswith(("conv1.", "bn1.", "layer1."))]
    for key in stats + frozen:
        assert torch.equal(state[_student_key(key)], reference[key]), key
    # The rest of the backbone trains, BatchNorm's affine parameters of layer2-4 included (mmdetection's requires_grad=True).
    assert not torch.equal(state[_student_key("layer2.0.conv1.weight")], reference["layer2.0.conv1.weight"])
    assert not torch.equal(state[_student_key("layer4.1.bn2.weight")], reference["layer4.1.bn2.weight"])


def test_train_backbone_all_trains_stem_and_statistics(world, tmp_path, resnet18_file):
    path, reference = resnet18_file
    state = _train(world, tmp_path / "all", path, "--train-backbone-all")
    assert not torch.equal(state[_student_key("conv1.weight")], reference["conv1.weight"])
    assert not torch.equal(state[_student_key("layer1.0.bn1.running_mean")], reference["layer1.0.bn1.running_mean"])


def test_backbone_flags_refused_where_they_cannot_apply(world, tmp_path, resnet18_file, capsys):
    from distillery.cli import main

    path, _ = resnet18_file
    base = ["train", "--store", str(world.store), "--annotations", str(world.annotations), "--images", str(world.images),
            "--out", str(tmp_path / "x"), "--device", "cpu", "--iters", "1", "--num-workers", "0"]
    assert main(base + ["--student", "gfl_tiny", "--backbone-weights", str(path)]) == 2
    assert "backbone_weights" in capsys.readouterr().err
    assert main(base + ["--student", "gfl_r18", "--train-backbone-all"]) == 2
    assert "--backbone-weights" in capsys.readouterr().err
    assert main(base + ["--student", "gfl_r18", "--backbone-weights", str(tmp_path / "absent.pth"),
                        "--set", "student.fpn_channels=16", "--set", "schedule.tensorboard=false"]) == 2
    assert "absent.pth" in capsys.readouterr().err
