#!/usr/bin/env bash
# The main job on the built-in default: synthetic dataset -> teacher -> precompute on a local
# Ray cluster -> label store -> students trained against it (two seeds each) -> AP table + HTML report.
# Extra arguments go to `distill quickstart` (see `--help`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$repo/scripts/env.sh")"
cd "$repo"
# OpenMP threads that spin while waiting starve each other on a shared, small machine.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$venv/bin/distill" quickstart "$@"
