"""The product's promise: student_trainer never imports teacher_service, not even to train."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULES = [
    "student_trainer", "student_trainer.config", "student_trainer.data", "student_trainer.sources",
    "student_trainer.distill", "student_trainer.train", "student_trainer.ray_train", "student_trainer.cli",
    "student_trainer.losses", "student_trainer.losses.recipes",
]


def test_no_teacher_service_module_is_loaded_by_importing_or_training(world, tmp_path):
    script = textwrap.dedent(
        f"""
        import importlib, json, sys
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        import torch
        torch.set_num_threads(1)
        for name in {MODULES!r}:
            importlib.import_module(name)
        after_import = sorted(m for m in sys.modules if m.split(".")[0] == "teacher_service")
        from student_fixtures import World, run_config
        from student_trainer.train import train_student
        paths = json.loads(sys.argv[1])
        world = World(**{{k: __import__("pathlib").Path(v) for k, v in paths.items()}})
        summary = train_student(run_config(world, {str(tmp_path / "run")!r}, losses="all", iters=1), progress=False)
        after_training = sorted(m for m in sys.modules if m.split(".")[0] == "teacher_service")
        print(json.dumps({{"after_import": after_import, "after_training": after_training, "steps": summary["step"]}}))
        """
    )
    paths = {k: str(v) for k, v in vars(world).items()}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(paths)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["steps"] == 1
    assert report["after_import"] == [] and report["after_training"] == []


def test_student_trainer_sources_do_not_mention_teacher_service_imports():
    offenders = []
    for path in (REPO / "student_trainer").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import teacher_service", "from teacher_service")) or "import_module(\"teacher_service" in stripped:
                offenders.append(f"{path}:{number}")
    assert offenders == []
