#!/usr/bin/env bash
# Run the test suite in the project's environment (built on first use). Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$repo/scripts/env.sh")"
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
