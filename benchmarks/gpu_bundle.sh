#!/usr/bin/env bash
# Build .whl/site312.tar.xz: the Python packages the project needs that a GPU machine's
# image lacks (its python3 is 3.12 with torch, numpy, pyarrow, pandas and most of the rest),
# as one unpacked site folder for `benchmarks/gpu_check.sh` to extract onto PYTHONPATH.
# Versions are requirements.lock's; wheels for CPython 3.12 on x86_64 Linux come from the
# package index (pip download, no install). The Ray wheel loses its Java jars, its dashboard's
# web client and RLlib (none used) so that the bundle stays small
# (~37 MB). Run from anywhere; `.whl/` is git-ignored.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
packages=(ray zarr numcodecs donfig google-crc32c pycocotools jsonschema jsonschema-specifications referencing rpds-py)
pins=()
for name in "${packages[@]}"; do
    pin="$(grep -i -E "^${name//-/[-_]}==" "$repo/requirements.lock")" || { echo "gpu_bundle: $name is not in requirements.lock" >&2; exit 2; }
    pins+=("$pin")
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/wheels" "${pins[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
mkdir -p "$work/site"
# Unzip keeping each file's mode (python -m zipfile -e drops it, and Ray's gcs_server and
# raylet must stay executable).
python3 - "$work/site" "$work"/wheels/*.whl <<'PY'
import os, sys, zipfile
site = sys.argv[1]
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = archive.extract(info, site)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode)
PY
rm -rf "$work"/site/ray/jars "$work"/site/ray/dashboard/client/build "$work"/site/ray/rllib "$work"/site/ray-*.data
mkdir -p "$repo/.whl"
tar -C "$work/site" -cf - . | xz -T0 -6 > "$repo/.whl/site312.tar.xz"
ls -l "$repo/.whl/site312.tar.xz"
