#!/usr/bin/env bash
# The GPU measurements of benchmarks/, as one command for any CUDA machine with the
# project's dependencies.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          (STEPS="name ..." runs only those steps)
#
# 1. precompute overhead with the teacher on the GPU (benchmarks/precompute_overhead.py
#    --device cuda): the benchmark's gfl_r18 (64 ch) teacher at canvas 256, 1600 views; and a
#    gfl_r50 (256 ch) teacher at canvas 512, 300 views; each with a fidelity check of the
#    stored targets against a float32 forward on the GPU; the r18 step adds a warm job with
#    the quantization back in the write tasks (--quantize-on-device off), the r50 step one with
#    0.34 CPU per task; and the r18 job again with zstd level 3 instead of 15 in the cls, box
#    and fpn codecs (the "bound by" row's advice when writing binds).
# 2. training step time on the GPU (benchmarks/train_step_speed.py --device cuda): no KD vs
#    offline targets vs the in-process teacher; with the loader in the step (workers 0, steps
#    alternating), and with 6 DataLoader workers, one configuration at a time (--sequential).
# GPU utilisation is sampled once a second into OUT_DIR/gpu.csv. Each step has a time limit,
# so a hang costs one step, not the run. Python packages the machine lacks can come as an
# unpacked site folder in .whl/site312.tar.xz, built here by benchmarks/gpu_bundle.sh; carry
# that folder with the repository to the GPU machine.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/distillery-gpu-check}}"
mkdir -p "$out"
if [ -f .whl/site312.tar.xz ]; then
    mkdir -p /tmp/site && tar -xJf .whl/site312.tar.xz -C /tmp/site || exit 1
    # Bundles unpacked with `zipfile -e` lose the exec bits of Ray's own programs: restore them.
    find /tmp/site/ray/core -type f ! -name '*.py' -exec chmod +x {} +
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_TMPDIR=/tmp/ray-gpu-check
mkdir -p "$RAY_TMPDIR"
py="${PYTHON:-python3}"

date -u +"%Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "cpus $(nproc), memory $(free -g | awk '/Mem:/ {print $2}') GiB, /dev/shm $(df -h /dev/shm | awk 'NR==2 {print $2}')"
"$py" -c 'import sys, torch, ray, zarr, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "ray", ray.__version__, "zarr", zarr.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available())' || exit 1

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$out/gpu.csv" 2>/dev/null &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    case " ${STEPS:-$name} " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    local began=$SECONDS
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "-- $name: exit $rc in $((SECONDS - began)) s"
    grep -v "INFO\|WARNING\|^\s*$\|Tasks: \|Queued blocks\|=====\|logging_progress\|streaming_executor\|core_worker\|logging.cc\|^\s*@\|SIGTERM\|^PC:" "$out/$name.log" | tail -n 40
}

step precompute_r18_256 170 "$py" benchmarks/precompute_overhead.py --device cuda --num-images 800 --canvas 256 \
    --batch-size 32 --views-per-part 64 --synth-workers 12 --check-views 16 --also-quantize-on-device off \
    --work /tmp/bench-r18 --json "$out/precompute_r18_256.json"
step precompute_r18_256_zstd3 170 "$py" benchmarks/precompute_overhead.py --device cuda --num-images 800 --canvas 256 \
    --batch-size 32 --views-per-part 64 --synth-workers 12 --also-quantize-on-device off \
    --codec cls=int5-view-dchw+zstd3 --codec box=int6-view-dbhw+zstd3 --codec fpn=int6-view-dhw+zstd3 \
    --work /tmp/bench-r18 --json "$out/precompute_r18_256_zstd3.json"
step precompute_r50_512 150 "$py" benchmarks/precompute_overhead.py --device cuda --num-images 150 --canvas 512 \
    --arch gfl_r50 --channels 256 --batch-size 32 --views-per-part 16 --synth-workers 12 --check-views 4 \
    --also-cpus-per-task 0.34 --work /tmp/bench-r50 --json "$out/precompute_r50_512.json"
step train_step_cuda 120 "$py" benchmarks/train_step_speed.py --device cuda --threads 8 --num-images 128 \
    --batch-size 16 --steps 20 --warmup 3 --losses ld,all --work /tmp/bench-train --json-out "$out/train_step_cuda.json"
step train_step_cuda_workers 200 "$py" benchmarks/train_step_speed.py --device cuda --threads 4 --num-images 128 \
    --batch-size 16 --steps 30 --warmup 5 --num-workers 6 --sequential --losses ld,ld+ld_im,all \
    --work /tmp/bench-train --json-out "$out/train_step_cuda_workers.json"
