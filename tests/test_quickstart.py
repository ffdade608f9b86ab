"""`distill quickstart` end to end on the tiny 'smoke' preset: every step's wiring, in subprocesses."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_smoke_runs_every_step_and_prints_the_ap_table(tmp_path):
    env = dict(os.environ, DISTILLERY_HOME=str(tmp_path), TQDM_DISABLE="1")
    completed = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "quickstart", "--preset", "smoke"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    for step in ("dataset", "teacher", "precompute", "student baseline", "student + LD"):
        assert f"[quickstart] {step}:" in out
    table_rows = [line for line in out.splitlines() if line.startswith(("teacher gfl_tiny", "gfl_tiny baseline", "gfl_tiny + LD"))]
    assert len(table_rows) == 3, out[-2000:]
    # Every number in the table comes from a file the steps wrote.
    results = json.loads((tmp_path / "students" / "smoke" / "ld" / "results.json").read_text())
    assert set(results["coco"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "teacher" / "smoke-gfl_tiny" / "final.pt").exists()
    assert (tmp_path / "stores" / "smoke-gfl_tiny.zarr").is_dir()
