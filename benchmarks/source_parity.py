"""How far apart the offline (store) and in-process targets of the same views are.

For the first ``--views`` committed views of a store, reads the targets through
`student_trainer.sources.StoreSource` and computes them with the teacher in this process
(`InProcessTeacherSource`, the online baseline) on the very canvases the student would be
given, and prints per target the max and mean absolute difference next to the spread
(std) of the values. With an fp32 store the difference is float rounding alone (a forward
over another batch size takes other reduction orders); with a quantized store it is the
codec's error, which `distill store inspect` states.

    python benchmarks/source_parity.py --store S --teacher T.pt --annotations A.json --images DIR [--views 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--teacher", required=True, help="the checkpoint the store was written with")
    parser.add_argument("--annotations", required=True, help="COCO JSON of the store's images")
    parser.add_argument("--images", required=True)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from detcore.coco import CocoDataset
    from detcore.datasets import ViewDataset, collate_views
    from student_trainer.sources import InProcessTeacherSource, StoreSource

    torch.set_num_threads(args.threads)
    probe = StoreSource(args.store, [])
    names = [spec.name for spec in probe.specs]
    store = StoreSource(args.store, names)
    views = [view for view, _ in store.stored_views()][: args.views]
    dataset = CocoDataset(args.annotations, args.images)
    rendered = ViewDataset(dataset, views)
    batch = collate_views([rendered[i] for i in range(len(views))])
    offline = store.get(views)
    online = InProcessTeacherSource(args.teacher, names).get(views, images=batch["images"])
    codecs = {spec.name: spec.codec for spec in store.specs}
    rows = []
    print(f"# {len(views)} views of {args.store}; teacher {args.teacher}")
    print("| target | codec | max abs diff | mean abs diff | std of values |")
    print("|---|---|---|---|---|")
    for name in names:
        diff = (offline[name] - online[name]).abs()
        row = {"target": name, "codec": codecs[name], "max_abs_diff": float(diff.max()),
               "mean_abs_diff": float(diff.mean()), "std": float(online[name].std())}
        rows.append(row)
        print(f"| {name} | {row['codec']} | {row['max_abs_diff']:.3g} | {row['mean_abs_diff']:.3g} | {row['std']:.3g} |")
    if args.json:
        args.json.write_text(json.dumps({"store": args.store, "views": len(views), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
