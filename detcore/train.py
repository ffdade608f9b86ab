"""Train and evaluate GFL detectors (teachers and student baselines) on a COCO-format dataset.

Every image is planned into K views (``scales`` x {original, flip}) sized by mmdetection's
keep-ratio rule for the canvas (landscape images on it, portrait ones on its transpose);
each epoch trains on one randomly chosen view per image, in batches of one canvas each
(`detcore.datasets.CanvasBatchSampler`), so a resumed run replays exactly the views an
uninterrupted one would have seen.

Outputs in ``out_dir``: ``last.pt`` (resume state, written every ``checkpoint_every``
steps), ``final.pt`` (weights only, at the end) and ``metrics.json``. A run restarted
with the same ``out_dir`` resumes from ``last.pt``; a different configuration there is
refused (`TrainConfigMismatchError`). Images that fail to decode are skipped and listed
by id in ``metrics.json`` (and printed), never a crash. Ctrl-C or SIGTERM ends the current
step, writes ``last.pt`` and raises `detcore.interrupt.Interrupted` (exit 130 / 143).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detcore.engine import (
    CallbackHook, CheckpointHook, ProgressBarHook, Trainer, config_difference, config_identity, load_resume_state,
    write_json_atomic,
)

OPTIMIZERS = ("adamw", "sgd")
OPTIMIZER_DEFAULTS = {
    "adamw": {"schedule": "cosine", "lr": 2e-3, "weight_decay": 0.05},
    "sgd": {"schedule": "step", "lr": 0.01, "weight_decay": 1e-4},
}
"""Per optimizer: its learning-rate schedule (warm-up, then cosine or mmdetection's 1x step
decay) and the peak learning rate and weight decay used when none is given."""
# Fields that may change between a run and its resumption (they do not change the result).
_RESUME_FREE_FIELDS = frozenset(
    {"out_dir", "num_workers", "eval_every", "checkpoint_every", "log_every", "val_annotations", "val_images", "device",
     "amp", "channels_last", "num_threads"}
)


class TrainConfigMismatchError(ValueError):
    """``out_dir/last.pt`` belongs to a run with another configuration."""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One detector training run (built from the CLI by `detcore.cli_detector`)."""

    annotations: str
    """COCO annotation file of the training set."""
    images: str
    """Folder the training images' ``file_name`` is relative to."""
    arch: str
    """Architecture: ``gfl_tiny``, ``gfl_r18``, ``gfl_r34``, ``gfl_r50`` or ``gfl_r101``."""
    out_dir: str
    """Where ``last.pt``, ``final.pt`` and ``metrics.json`` go."""
    canvas: tuple[int, int] = (256, 256)
    """Canvas (H, W) every view is rendered into."""
    iters: int | None = None
    """Training steps; exclusive with ``epochs``."""
    epochs: int | None = None
    """Passes over the images (one view each); used when ``iters`` is None (default 12)."""
    batch_size: int = 8
    """Views per step."""
    lr: float | None = None
    """Peak learning rate; default 2e-3 for AdamW, 0.01 for SGD."""
    optimizer: str = "adamw"
    """``adamw`` (linear warm-up, cosine decay to 1 %; for training from scratch) or ``sgd``
    (momentum 0.9, linear warm-up, x0.1 at 8/12 and 11/12 of the run: mmdetection's 1x)."""
    weight_decay: float | None = None
    """Default 0.05 for AdamW, 1e-4 for SGD; never applied to biases and norm parameters."""
    warmup_iters: int | None = None
    """Linear warm-up steps from 0.1 % of the peak; default min(500, 10 % of the run)."""
    grad_clip_norm: float | None = 35.0
    """Clip the global gradient norm (None: no clipping)."""
    fpn_channels: int | None = None
    """FPN width; default per architecture (see `detcore.models.gfl.build_detector`)."""
    head_channels: int | None = None
    """Head tower width; default the FPN width."""
    num_convs: int | None = None
    """Convs per head tower; default per architecture."""
    backbone_weights: str | None = None
    """ResNet state_dict file to start from (never downloaded)."""
    scales: tuple[float, ...] = (1.0,)
    """View scales relative to mmdetection's keep-ratio size for the canvas (each with a flipped twin when ``flip``)."""
    flip: bool = True
    """Plan a mirrored twin of every view."""
    num_workers: int = 2
    """DataLoader worker processes (0: load in the training process)."""
    seed: int = 0
    """Seed of the weights' initialisation and the view order."""
    eval_every: int = 0
    """Evaluate on the val set every this many steps (0: only at the end)."""
    checkpoint_every: int = 200
    """Write ``last.pt`` every this many steps (and always at the end)."""
    log_every: int = 20
    """Record the mean losses every this many steps in ``metrics.json``."""
    val_annotations: str | None = None
    """COCO annotation file of the validation set (AP at the end when given)."""
    val_images: str | None = None
    """Image folder of the validation set."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    amp: bool = True
    """Mixed precision (bfloat16, or float16 with loss scaling), on CUDA only."""
    channels_last: bool = True
    """Channels-last memory format, on every device (on the 2-core CPU: forward ~20 % cheaper, see benchmarks/RESULTS.md)."""
    num_threads: int | None = None
    """torch intra-op threads (None: torch's default, one per core)."""

    def validate(self) -> None:
        from detcore.models.gfl import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ValueError(f"TrainConfig(arch=) expects one of {sorted(ARCHITECTURES)}. Got {self.arch!r}.")
        if self.iters is not None and self.epochs is not None:
            raise ValueError(f"TrainConfig expects iters or epochs, not both. Got iters={self.iters}, epochs={self.epochs}.")
        for name in ("iters", "epochs"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"TrainConfig({name}=) expects a positive integer. Got {value}.")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig(batch_size=) expects a positive integer. Got {self.batch_size}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig(optimizer=) expects one of {OPTIMIZERS}. Got {self.optimizer!r}.")
        if len(self.canvas) != 2 or min(self.canvas) < 32:
            raise ValueError(f"TrainConfig(canvas=) expects (H, W) of at least 32 px each. Got {self.canvas}.")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"TrainConfig(lr=) expects a positive number. Got {self.lr}.")
        if (self.val_annotations is None) != (self.val_images is None):
            raise ValueError(
                "TrainConfig expects val_annotations and val_images together. "
                f"Got val_annotations={self.val_annotations!r}, val_images={self.val_images!r}."
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"TrainConfig(num_threads=) expects a positive integer or None. Got {self.num_threads}.")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.eval_every < 0 or self.num_workers < 0:
            raise ValueError(
                "TrainConfig expects checkpoint_every >= 1, log_every >= 1, eval_every >= 0, num_workers >= 0. "
                f"Got {self.checkpoint_every}, {self.log_every}, {self.eval_every}, {self.num_workers}."
            )

    @property
    def peak_lr(self) -> float:
        return float(self.lr) if self.lr is not None else OPTIMIZER_DEFAULTS[self.optimizer]["lr"]

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return OPTIMIZER_DEFAULTS[self.optimizer]["weight_decay"]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["canvas"] = list(self.canvas)
        out["scales"] = list(self.scales)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        values = dict(data)
        if "canvas" in values:
            values["canvas"] = tuple(int(v) for v in values["canvas"])
        if "scales" in values:
            values["scales"] = tuple(float(v) for v in values["scales"])
        return cls(**values)


def learning_rate_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``.

    Linear warm-up from 0.001 over ``warmup`` steps, then ``cosine`` (AdamW: to 0.01 at the
    end) or ``step`` (SGD: x0.1 after 8/12 and again after 11/12 of the run).
    """
    if warmup > 0 and step < warmup:
        return 0.001 + (1.0 - 0.001) * step / warmup
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        factor = 1.0
        for milestone in (8 / 12, 11 / 12):
            if step >= int(round(milestone * total)):
                factor *= 0.1
        return factor
    raise ValueError(f"learning_rate_factor(schedule=) expects 'cosine' or 'step'. Got {schedule!r}.")


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig(device=) asks for {name!r}, but CUDA is not available. Use --device cpu.")
    return device


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, name: str, lr: float, weight_decay: float):
    """AdamW (betas 0.9, 0.999) or SGD (momentum 0.9) over ``model``'s trainable parameters.

    Weight decay applies to weights (2-D and up) only, never to biases and norm parameters.
    """
    import torch

    groups = _param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"build_optimizer(name=) expects one of {OPTIMIZERS}. Got {name!r}.")


def _config_identity(config: TrainConfig) -> dict[str, Any]:
    """The fields that define the result, paths resolved (compared on resume)."""
    return config_identity(config.to_dict(), resume_free=_RESUME_FREE_FIELDS, paths=("annotations", "images", "backbone_weights"))


def autocast_context(device, enabled: bool):
    """Training autocast for ``device``: bf16 (fp16 where unsupported) on CUDA when ``enabled``,
    else a no-op; and whether fp16 needs a gradient scaler."""
    import contextlib

    import torch

    if not enabled or device.type != "cuda":
        return contextlib.nullcontext(), False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype == torch.float16


def optimizer_step(loss, optimizer, scaler, parameters, clip_norm: float | None) -> bool:
    """One step on ``loss``: backward through the AMP ``scaler``, gradients clipped to ``clip_norm``.

    The gradients are cleared first. A loss that is not finite takes no step (and leaves the
    weights as they were): returns False, so the caller can count it.
    """
    import torch

    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    scaler.scale(loss).backward()
    if clip_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return True


def evaluate_model(
    model,
    dataset,
    canvas_hw: tuple[int, int],
    *,
    batch_size: int = 8,
    device=None,
    num_workers: int = 0,
    progress: bool = False,
    score_thr: float = 0.05,
    channels_last: bool = True,
) -> dict[str, Any]:
    """COCO AP of a detector on a dataset, one unflipped view at scale 1.0 per image.

    Views follow mmdetection's keep-ratio rule for ``canvas_hw`` (landscape images on it,
    portrait ones on its transpose); each batch holds one canvas.

    Canvas detections are mapped back to source-image pixels through each view
    (`detcore.evaluate.detections_to_image`). Images that fail to decode are left out of
    the evaluation and listed.

    Returns:
        The metrics of `detcore.evaluate.coco_evaluate` (AP, AP50, AP75, APs, APm, APl)
        plus ``num_images`` (evaluated) and ``failed_image_ids``.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from detcore.datasets import ViewDataset, canvas_batches, collate_views
    from detcore.evaluate import coco_evaluate, detections_to_image
    from detcore.views import plan_views

    device = next(model.parameters()).device if device is None else torch.device(device)
    views = plan_views(
        [(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids],
        canvas_hw=tuple(canvas_hw),
        scales=(1.0,),
        flip=False,
    )
    # A batch holds views of one canvas (landscape and portrait views do not stack).
    loader = DataLoader(
        ViewDataset(dataset, views), batch_sampler=canvas_batches(views, batch_size), num_workers=num_workers, collate_fn=collate_views
    )
    was_training = model.training
    model.eval()
    detections, evaluated, failed = [], [], {}
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
                for failure in batch["failures"]:
                    failed[failure.image_id] = failure.reason
                if batch["images"] is None:
                    continue
                images = batch["images"].to(device)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                outputs = model(images)
                predictions = model.predict(outputs, score_thr=score_thr, canvas_hw=tuple(images.shape[-2:]))
                for view, prediction in zip(batch["views"], predictions):
                    detections.append(
                        {
                            "image_id": view.image_id,
                            "boxes": detections_to_image(prediction["boxes"].float().cpu(), view),
                            "scores": prediction["scores"].float().cpu().numpy(),
                            "labels": prediction["labels"].cpu().numpy(),
                        }
                    )
                    evaluated.append(view.image_id)
    finally:
        model.train(was_training)
    metrics: dict[str, Any] = coco_evaluate(dataset, detections, image_ids=evaluated) if evaluated else {}
    metrics["num_images"] = len(evaluated)
    metrics["failed_image_ids"] = sorted(failed)
    return metrics


def evaluate_detector(
    checkpoint: str | os.PathLike,
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    batch_size: int = 8,
    *,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint and evaluate it on a COCO dataset at the checkpoint's canvas (see `evaluate_model`)."""
    import torch

    from detcore.checkpoint import load_detector_with_meta
    from detcore.coco import CocoDataset

    dev = resolve_device(device)
    model, meta = load_detector_with_meta(checkpoint, map_location=dev)
    dataset = CocoDataset(annotations, images)
    if tuple(dataset.classes) != tuple(meta["classes"]):
        raise ValueError(
            f"evaluate_detector(annotations=) expects the classes the checkpoint was trained on, {list(meta['classes'])}. "
            f"Got {list(dataset.classes)} in {annotations}."
        )
    model = model.to(memory_format=torch.channels_last)
    return evaluate_model(
        model, dataset, meta["canvas_hw"], batch_size=batch_size, device=dev, num_workers=num_workers, progress=progress
    )


def train_detector(config: TrainConfig, *, stop_after_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a detector; returns the content of ``metrics.json``.

    Args:
        config: the run.
        stop_after_steps: stop after this many steps *of this call*, with ``last.pt``
            written, as if the process had been killed there (for tests and time-boxed
            jobs); the result then has ``"finished": False``.
        progress: show a tqdm progress bar with the loss and images/s.
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from detcore.checkpoint import save_checkpoint
    from detcore.coco import CocoDataset
    from detcore.datasets import CanvasBatchSampler, ViewDataset, collate_views
    from detcore.interrupt import ignore_stop_signals
    from detcore.models.gfl import build_detector
    from detcore.views import plan_views

    config.validate()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, final_path = out_dir / "last.pt", out_dir / "final.pt"
    device = resolve_device(config.device)

    dataset = CocoDataset(config.annotations, config.images)
    views = plan_views(
        [(i, dataset.record(i).height, dataset.record(i).width) for i in dataset.image_ids],
        canvas_hw=tuple(config.canvas),
        scales=config.scales,
        flip=config.flip,
    )
    num_images = len(dataset.image_ids)
    if num_images == 0:
        raise ValueError(f"train_detector(annotations=) expects at least one image. Got none in {config.annotations}.")
    # Batches of one canvas each, the same count every epoch (mmdetection's aspect-ratio grouping).
    sampler = CanvasBatchSampler(views, config.batch_size, seed=config.seed)
    iters_per_epoch = sampler.num_batches
    total_steps = int(config.iters) if config.iters is not None else int(config.epochs or 12) * iters_per_epoch
    warmup = int(config.warmup_iters) if config.warmup_iters is not None else min(500, total_steps // 10)
    schedule = OPTIMIZER_DEFAULTS[config.optimizer]["schedule"]

    torch.manual_seed(config.seed)
    model = build_detector(
        config.arch,
        dataset.num_classes,
        fpn_channels=config.fpn_channels,
        head_channels=config.head_channels,
        num_convs=config.num_convs,
        backbone_weights=config.backbone_weights,
    ).to(device)
    use_channels_last = config.channels_last
    if use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.optimizer, config.peak_lr, config.decay)
    autocast, use_scaler = autocast_context(device, config.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    step, history, failures, nonfinite_steps, train_seconds, images_seen = 0, [], {}, 0, 0.0, 0
    identity = _config_identity(config)
    state = load_resume_state(last_path, identity, caller="train_detector", error=TrainConfigMismatchError)
    if state is not None:
        training = state.get("training") or {}
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(training["optimizer"])
        if training.get("scaler"):
            scaler.load_state_dict(training["scaler"])
        torch.set_rng_state(training["torch_rng"])
        step = int(training["step"])
        history = list(training.get("history", []))
        failures = {int(k): v for k, v in training.get("failures", {}).items()}
        nonfinite_steps = int(training.get("nonfinite_steps", 0))
        train_seconds = float(training.get("train_seconds", 0.0))
        images_seen = int(training.get("images_seen", 0))
        print(f"Resuming {config.arch} from {last_path} at step {step}/{total_steps}.", file=sys.stderr)

    def save_last() -> None:
        training_state = {
            "step": trainer.step,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None,
            "torch_rng": torch.get_rng_state(),
            "config_identity": identity,
            "train_config": config.to_dict(),
            "history": history,
            "failures": {str(k): v for k, v in failures.items()},
            "nonfinite_steps": nonfinite_steps,
            "train_seconds": trainer.train_seconds,
            "images_seen": images_seen,
        }
        save_checkpoint(last_path, model, classes=dataset.classes, canvas_hw=config.canvas, training=training_state)

    val_dataset = CocoDataset(config.val_annotations, config.val_images) if config.val_annotations else None
    loader = DataLoader(
        ViewDataset(dataset, views),
        batch_sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=collate_views,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals if config.num_workers > 0 else None,
    )
    window: dict[str, list[float]] = {}
    periodic_evals: list[dict[str, Any]] = []

    def run_step(batch: dict[str, Any]) -> None:
        nonlocal nonfinite_steps, images_seen
        for failure in batch["failures"]:
            if failure.image_id not in failures:
                failures[failure.image_id] = {"path": failure.path, "reason": failure.reason}
                bar.write(f"skipping image_id={failure.image_id}: {failure.reason}")
        if batch["images"] is None:
            return
        lr = config.peak_lr * learning_rate_factor(trainer.step, total_steps, warmup, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = batch["images"].to(device, non_blocking=True)
        if use_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            outputs = model(images)
        gt_boxes = [b.to(device) for b in batch["gt_boxes"]]
        gt_labels = [lb.to(device) for lb in batch["gt_labels"]]
        losses = model.loss(outputs, gt_boxes, gt_labels)
        loss = sum(losses.values())
        if optimizer_step(loss, optimizer, scaler, model.parameters(), config.grad_clip_norm):
            for name, value in losses.items():
                window.setdefault(name, []).append(float(value.detach()))
            window.setdefault("loss", []).append(float(loss.detach()))
        else:
            nonfinite_steps += 1
        images_seen += images.shape[0]

    def log(trainer: Trainer) -> None:
        if trainer.step % config.log_every == 0 or trainer.step == total_steps:
            if window:
                history.append({"step": trainer.step, **{k: float(np.mean(v)) for k, v in window.items()}})
            window.clear()

    def periodic_eval(trainer: Trainer) -> None:
        step = trainer.step
        if val_dataset is not None and config.eval_every and step % config.eval_every == 0 and step < total_steps:
            result = evaluate_model(model, val_dataset, config.canvas, batch_size=config.batch_size, device=device)
            periodic_evals.append({"step": step, **result})
            bar.write(f"step {step}: AP {result.get('AP', float('nan')):.4f}")
            trainer.reset_timer()

    def postfix() -> dict[str, str] | None:
        if not window.get("loss"):
            return None
        return {"loss": f"{window['loss'][-1]:.3f}", "img_s": f"{images_seen / max(trainer.train_seconds, 1e-9):.1f}"}

    bar = ProgressBarHook(f"train {config.arch}", enabled=progress, postfix=postfix)
    hooks = [bar, CallbackHook(after_step=log), CallbackHook(after_step=periodic_eval), CheckpointHook(save_last, config.checkpoint_every)]
    trainer = Trainer(run_step, loader, sampler, total_steps, hooks, start_step=step, train_seconds=train_seconds,
                      stop_after_steps=stop_after_steps)
    model.train()
    stopped = not trainer.train()
    step, train_seconds, stop = trainer.step, trainer.train_seconds, trainer.stop

    summary: dict[str, Any] = {
        "finished": not stopped,
        "arch": config.arch,
        "step": step,
        "total_steps": total_steps,
        "iters_per_epoch": iters_per_epoch,
        "epochs": step / iters_per_epoch,
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(images_seen / train_seconds, 3) if train_seconds > 0 else None,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "history": history,
        "periodic_evals": periodic_evals,
        "failed_images": [{"image_id": k, **v} for k, v in sorted(failures.items())],
        "nonfinite_steps": nonfinite_steps,
        "device": str(device),
        "config": config.to_dict(),
        "detector_config": model.config.to_dict(),
        "classes": list(dataset.classes),
        "canvas_hw": list(config.canvas),
        "val": None,
    }
    if stopped:
        stop.raise_if_requested(f"{last_path} holds step {step}/{total_steps}; re-run the same command to resume")
        return summary
    if val_dataset is not None:
        summary["val"] = evaluate_model(
            model, val_dataset, config.canvas, batch_size=config.batch_size, device=device, progress=progress
        )
    metadata = {k: summary[k] for k in ("step", "train_seconds", "images_per_second", "val") if summary[k] is not None}
    save_checkpoint(final_path, model, classes=dataset.classes, canvas_hw=config.canvas, metadata=metadata)
    write_json_atomic(out_dir / "metrics.json", summary)
    if failures:
        ids = ", ".join(str(k) for k in sorted(failures))
        print(f"{len(failures)} image(s) could not be decoded and were skipped: image_id {ids}", file=sys.stderr)
    return summary


def parse_canvas(text: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"192x256"`` -> (192, 256) (H x W)."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 32:
        raise ValueError(f"--canvas expects SIZE or HxW with sides of at least 32 px. Got {text!r}.")
    return (values[0], values[1])


__all__ = (
    "TrainConfig",
    "TrainConfigMismatchError",
    "evaluate_detector",
    "evaluate_model",
    "learning_rate_factor",
    "parse_canvas",
    "train_detector",
)
