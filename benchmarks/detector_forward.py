"""CPU forward time (and, optionally, training-step throughput) of the GFL detectors.

Usage:
    python benchmarks/detector_forward.py [--canvas 256] [--batch 8] [--threads 2] [--repeats 5]
        [--archs gfl_tiny:32,gfl_r18:64,gfl_r34:128] [--train-steps 0] [--num-classes 12] [--channels-last]

Prints one row per architecture: parameters, forward ms per image (eval mode, no_grad;
``--repeats`` timed batches after two warm-up batches) and, with ``--train-steps N``,
training images/s (forward + GFL loss + backward + AdamW step on random images with
three GT boxes each; N timed steps after one warm-up). Each figure is given as best /
median: on a shared machine other jobs only ever add time, so the best run is the
closest to the machine's own speed, and the median shows how much the load moved it.
With ``--threads 1`` the process CPU time per image is printed as well ("cpu"): it is
nearly independent of other jobs (no second thread to wait for), so it is the most
reproducible figure on a shared machine. The 1-minute load average before and after is
printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def _gt(batch: int, canvas: int, num_classes: int, generator):
    import torch

    boxes, labels = [], []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=generator) * canvas * 0.6
        wh = 16 + torch.rand(3, 2, generator=generator) * canvas * 0.35
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=canvas)], dim=1))
        labels.append(torch.randint(0, num_classes, (3,), generator=generator))
    return boxes, labels


def measure(
    arch: str, channels: int, *, canvas: int, batch: int, repeats: int, train_steps: int, num_classes: int, channels_last: bool
):
    import torch

    from detcore.models.gfl import build_detector

    torch.manual_seed(0)
    model = build_detector(arch, num_classes, fpn_channels=channels, head_channels=channels)
    params = sum(p.numel() for p in model.parameters())
    images = torch.randn(batch, 3, canvas, canvas)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    model.eval()
    times, cpu_times = [], []
    with torch.no_grad():
        for index in range(repeats + 2):
            start, cpu_start = time.perf_counter(), time.process_time()
            model(images)
            if index >= 2:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    row = {
        "arch": arch,
        "channels": channels,
        "params": params,
        "forward_ms_per_image": 1000 * min(times) / batch,
        "forward_ms_per_image_median": 1000 * statistics.median(times) / batch,
        "forward_cpu_ms_per_image": 1000 * min(cpu_times) / batch,
    }
    if train_steps > 0:
        generator = torch.Generator().manual_seed(0)
        boxes, labels = _gt(batch, canvas, num_classes, generator)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        step_times, step_cpu_times = [], []
        for index in range(train_steps + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            losses = model.loss(model(images), boxes, labels)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            if index >= 1:
                step_times.append(time.perf_counter() - start)
                step_cpu_times.append(time.process_time() - cpu_start)
        row["train_images_per_second"] = batch / min(step_times)
        row["train_images_per_second_median"] = batch / statistics.median(step_times)
        row["train_images_per_cpu_second"] = batch / min(step_cpu_times)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvas", type=int, default=256, help="square canvas side (default: 256)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward batches (default: 10)")
    parser.add_argument("--archs", default="gfl_tiny:32,gfl_r18:64,gfl_r34:128", help="ARCH:CHANNELS list")
    parser.add_argument("--train-steps", type=int, default=0, help="also time N training steps (default: 0)")
    parser.add_argument("--num-classes", type=int, default=12, help="classes (default: 12, the synthetic benchmark)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights and inputs")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, canvas {args.canvas}, batch {args.batch}, "
          f"{'channels-last' if args.channels_last else 'contiguous'}, load average before {os.getloadavg()[0]:.2f}")
    header = f"{'arch':<10}{'ch':>5}{'params':>12}{'fwd ms/img best/median':>26}"
    if args.train_steps:
        header += f"{'train img/s best/median':>26}"
    if args.threads == 1:
        header += f"{'cpu: fwd ms/img':>17}" + (f"{'train img/cpu-s':>17}" if args.train_steps else "")
    print(header)
    for spec in args.archs.split(","):
        arch, channels = spec.split(":")
        row = measure(arch, int(channels), canvas=args.canvas, batch=args.batch, repeats=args.repeats,
                      train_steps=args.train_steps, num_classes=args.num_classes, channels_last=args.channels_last)
        fwd = f"{row['forward_ms_per_image']:.1f} / {row['forward_ms_per_image_median']:.1f}"
        line = f"{arch:<10}{int(channels):>5}{row['params']:>12,}{fwd:>26}"
        if args.train_steps:
            train = f"{row['train_images_per_second']:.1f} / {row['train_images_per_second_median']:.1f}"
            line += f"{train:>26}"
        if args.threads == 1:
            line += f"{row['forward_cpu_ms_per_image']:>17.1f}"
            if args.train_steps:
                line += f"{row['train_images_per_cpu_second']:>17.1f}"
        print(line, flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
