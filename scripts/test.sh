#!/usr/bin/env bash
# Run the test suite in the project's environment (built on first use). Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$repo/scripts/env.sh")"
cd "$repo"
# OpenMP threads that spin while waiting starve each other on a shared, small machine.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$venv/bin/python" -m pytest "$@"
