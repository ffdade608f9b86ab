"""label_store imports (every public name, and the CLI module) without torch."""

from __future__ import annotations

import os
import subprocess
import sys

import label_store


def test_import_does_not_load_torch():
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(label_store.__file__)))
    code = (
        "import sys, label_store, label_store.cli, label_store.testing\n"
        "names = [getattr(label_store, n) for n in label_store.__all__]\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print(len(names))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo_root), timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) == len(label_store.__all__) > 20


def test_cli_module_is_light():
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(label_store.__file__)))
    code = "import sys, label_store.cli\nheavy = [m for m in ('zarr', 'pyarrow', 'numpy', 'torch', 'fsspec') if m in sys.modules]\nprint(heavy)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo_root), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
