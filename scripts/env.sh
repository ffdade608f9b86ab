#!/usr/bin/env bash
# Create (once) or reuse the project's virtual environment and print its path.
# The venv lives outside the repository, keyed on the hash of requirements.lock,
# so a changed lock builds a new one and an unchanged lock reuses the cache.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$repo/requirements.lock"
py="${DISTILLERY_PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "distillery needs Python 3.11 (found $("$py" --version 2>&1)); set DISTILLERY_PYTHON" >&2
    exit 2
fi
# pip's extra-index warnings on this machine are noise; keep its real output and exit code.
pip_quiet() {
    "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
    return "${PIPESTATUS[0]}"
}
key="$(sha256sum "$lock" | cut -c1-16)"
cache="${DISTILLERY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distillery}"
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
    echo "[env] building $venv from requirements.lock (first run only; torch is large)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$py" -m venv "$venv"
    pip_quiet install -q --upgrade pip
    pip_quiet install -q -r "$lock"
    touch "$venv/.complete"
fi
# The project itself is installed editable on every call: cheap, and it tracks the checkout.
if [ ! -x "$venv/bin/distill" ] || ! "$venv/bin/python" -I -c 'import sys, distillery; sys.exit(not distillery.__file__.startswith(sys.argv[1]))' "$repo" 2>/dev/null; then
    pip_quiet install -q --no-deps --no-build-isolation -e "$repo"
fi
echo "$venv"
