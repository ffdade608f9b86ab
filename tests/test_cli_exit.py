"""The `distill` process entry point ends with the command's exit code, after exit handlers."""

import os
import subprocess
import sys

SCRIPT = """
import atexit, sys
atexit.register(lambda: print("exit handler ran", flush=True))
sys.argv = ["distill"] + sys.argv[1:]
from distillery.cli import main
main()
print("not reached")
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_entry_point_exits_with_the_commands_code_after_exit_handlers(tmp_path):
    result = _run("store", "inspect", str(tmp_path / "no-such-store"))
    assert result.returncode == 2, result.stderr
    assert "exit handler ran" in result.stdout
    assert "not reached" not in result.stdout


def test_entry_point_keeps_argparse_errors_and_help():
    bad = _run("train", "--no-such-flag")
    assert bad.returncode == 2
    assert "--no-such-flag" in bad.stderr
    ok = _run("--help")
    assert ok.returncode == 0
    assert "usage" in ok.stdout.lower()


def test_the_command_gives_numpy_blas_one_thread_unless_the_user_set_it():
    """Set before numpy loads, so DataLoader workers and Ray tasks inherit it (see distillery/cli.py)."""
    probe = "import distillery.cli, os; print(os.environ['OPENBLAS_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "1"
    env["OPENBLAS_NUM_THREADS"] = "3"
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip() == "3"
