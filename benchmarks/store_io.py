"""Label-store write and read throughput, and the effect of views per shard.

Writes N teacher-like synthetic views (default codecs, 320x320 canvas, 80 classes,
reg_max 16, 256 FPN channels: 3.4 MB of float32 targets per view) into a local store for
each shard size S, then reads them back:
    write        views/s (wall) and MB/s of float32 targets per CPU-second
    read         StoreReader.read one view at a time in random order (cold shard-index
                 cache, then warm), read_many in random batches of 16 (1 and 2 decode
                 threads) and in sequential batches of 16
    zarr-python  the same random single-view reads through zarr.Array indexing (for scale)
"per core" figures divide by the process CPU time (all threads), so they do not depend on
how busy the shared machine is; wall-clock views/s do.

    python benchmarks/store_io.py --views 128 --shards 1 16 64

``--source-store URL`` writes the first views of an existing store instead (its teacher's
real targets, decoded, with its fingerprint and codecs), e.g. the reproduction's store:

    python benchmarks/store_io.py --views 128 --shards 16 --source-store runs/repro/store.zarr
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=128, help="views written per shard size")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 16, 64], help="views per shard to compare")
    parser.add_argument("--canvas", type=int, nargs=2, default=(320, 320), metavar=("H", "W"))
    parser.add_argument("--source-store", help="write the first --views views of this store instead of synthetic ones")
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temporary directory)")
    args = parser.parse_args()

    import numcodecs.blosc
    import numpy as np
    import zarr

    numcodecs.blosc.set_nthreads(1)
    from label_store import TeacherFingerprint, create_store, default_target_specs, inspect_store, open_store
    from label_store.testing import synthetic_targets

    if args.source_store:
        source = open_store(args.source_store)
        fingerprint, specs = source.fingerprint, list(source.targets)
        canvas = tuple(fingerprint.canvas_hw)
        pool = source.read_many(source.keys()[: args.views])
    else:
        canvas = tuple(args.canvas)
        fingerprint = TeacherFingerprint("gfl_r50_fpn_synthetic", "0" * 64, tuple(f"class{i}" for i in range(80)), canvas, (8, 16, 32, 64, 128), 16, {})
        specs = default_target_specs(80, 16, canvas, (8, 16, 32, 64, 128), 256)
        pool = [synthetic_targets(specs, seed=i) for i in range(8)]
    fp32_mb = sum(s.fp32_nbytes for s in specs) / 1e6
    base = args.dir or tempfile.mkdtemp(prefix="store_io_")
    print(f"# {args.views} views/store, canvas {canvas}, {fp32_mb:.2f} MB fp32 per view, codecs {sorted({s.codec for s in specs})}")
    print("| S views/shard | files | MB/view stored | write views/s | write MB/s/core | write CPU ms/view | read random cold views/s/core | warm | read_many rnd16 views/s/core (1 thr) | (2 thr, wall views/s) | read_many seq16 views/s/core | zarr-python random views/s/core |")
    print("|" + "---|" * 12)
    rng = np.random.default_rng(0)
    try:
        for shard in args.shards:
            url = os.path.join(base, f"s{shard}.zarr")
            shutil.rmtree(url, ignore_errors=True)
            store = create_store(url, fingerprint, specs, views_per_shard=shard)
            with _Clock() as write:
                with store.open_part("bench") as part:
                    for image_id in range(args.views):
                        record = {"image_id": image_id, "view_id": 0, "view": "{}", "content_hash": "h", "valid_region": (0, 0, canvas[1], canvas[0])}
                        part.append(record, pool[image_id % len(pool)])
                    part.commit()
            info = inspect_store(url)
            files = sum(len(f) for _, _, f in os.walk(url))
            keys = [(i, 0) for i in range(args.views)]
            order = [keys[i] for i in rng.permutation(len(keys))]

            reader = open_store(url, threads=1)
            with _Clock() as cold:
                for key in order:
                    reader.read(*key)
            with _Clock() as warm:
                for key in order:
                    reader.read(*key)
            reader = open_store(url, threads=1)
            with _Clock() as batched:
                for start in range(0, len(order), 16):
                    reader.read_many(order[start : start + 16])
            reader2 = open_store(url, threads=2)
            with _Clock() as threaded:
                for start in range(0, len(order), 16):
                    reader2.read_many(order[start : start + 16])
            reader = open_store(url, threads=1)
            with _Clock() as sequential:
                for start in range(0, len(keys), 16):
                    reader.read_many(keys[start : start + 16])

            group = zarr.open_group(zarr.storage.LocalStore(url), mode="r")
            part_dir = reader._parts[0].part_dir
            arrays = [group[f"parts/{part_dir}/{s.name}"] for s in specs] + [group[f"parts/{part_dir}/quant"]]
            subset = order[: min(32, len(order))]
            with _Clock() as via_zarr:
                for image_id, _ in subset:
                    row = reader.record(image_id, 0)["row"]
                    for array in arrays:
                        array[row]
            n = args.views
            print(
                f"| {shard} | {files} | {info['bytes_per_view'] / 1e6:.3f} | {n / write.wall:.1f} | {n * fp32_mb / write.cpu:.0f} | "
                f"{1e3 * write.cpu / n:.2f} | "
                f"{n / cold.cpu:.0f} | {n / warm.cpu:.0f} | {n / batched.cpu:.0f} | {n / threaded.wall:.0f} | {n / sequential.cpu:.0f} | "
                f"{len(subset) / via_zarr.cpu:.0f} |"
            )
        print(f"# read MB/s per core = views/s/core x {fp32_mb:.2f} MB (float32 out)")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
