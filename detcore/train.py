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
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detcore.engine import (
    CallbackHook, CheckpointHook, HookBase, ProgressBarHook, Trainer, config_difference, config_identity, load_resume_state,
    write_json_atomic,
)
from detcore.optim import (
    OPTIMIZER_DEFAULTS, OPTIMIZERS, LossWindow, Optimization, autocast_context, build_optimizer, count_steps,
    learning_rate_factor, optimizer_step, progress_postfix,
)

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


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig(device=) asks for {name!r}, but CUDA is not available. Use --device cpu.")
    return device


def _config_identity(config: TrainConfig) -> dict[str, Any]:
    """The fields that define the result, paths resolved (compared on resume)."""
    return config_identity(config.to_dict(), resume_free=_RESUME_FREE_FIELDS, paths=("annotations", "images", "backbone_weights"))


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


class _DetectorRun:
    """One `train_detector` run: its data, model and optimisation, the step and the hooks of its `Trainer`."""

    def __init__(self, config: TrainConfig, progress: bool) -> None:
        import torch

        from detcore.coco import CocoDataset
        from detcore.datasets import CanvasBatchSampler
        from detcore.views import plan_views

        self.config, self.progress = config, progress
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.out_dir = Path(config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / "last.pt"
        self.device = resolve_device(config.device)
        self.dataset = CocoDataset(config.annotations, config.images)
        self.views = plan_views(
            [(i, self.dataset.record(i).height, self.dataset.record(i).width) for i in self.dataset.image_ids],
            canvas_hw=tuple(config.canvas), scales=config.scales, flip=config.flip,
        )
        if not self.dataset.image_ids:
            raise ValueError(f"train_detector(annotations=) expects at least one image. Got none in {config.annotations}.")
        # Batches of one canvas each, the same count every epoch (mmdetection's aspect-ratio grouping).
        self.sampler = CanvasBatchSampler(self.views, config.batch_size, seed=config.seed)
        self.iters_per_epoch = self.sampler.num_batches
        self.total_steps = count_steps(config.iters, config.epochs or 12, self.iters_per_epoch)
        self.model = self._build_model()
        self.optim = Optimization(
            self.model, device=self.device, name=config.optimizer, peak_lr=config.peak_lr, weight_decay=config.decay,
            amp=config.amp, total_steps=self.total_steps, warmup_iters=config.warmup_iters, grad_clip=config.grad_clip_norm,
        )
        self.val_dataset = CocoDataset(config.val_annotations, config.val_images) if config.val_annotations else None
        self.window, self.history, self.failures, self.periodic_evals = LossWindow(), [], {}, []
        self.start_step, self.train_seconds, self.images_seen = 0, 0.0, 0
        self.identity = _config_identity(config)
        self._resume()
        self.trainer: Trainer | None = None
        self.bar = ProgressBarHook(f"train {config.arch}", enabled=progress, postfix=self.postfix)

    def _build_model(self):
        import torch

        from detcore.models.gfl import build_detector

        config = self.config
        torch.manual_seed(config.seed)
        model = build_detector(
            config.arch, self.dataset.num_classes, fpn_channels=config.fpn_channels, head_channels=config.head_channels,
            num_convs=config.num_convs, backbone_weights=config.backbone_weights,
        ).to(self.device)
        return model.to(memory_format=torch.channels_last) if config.channels_last else model

    def _resume(self) -> None:
        state = load_resume_state(self.last_path, self.identity, caller="train_detector", error=TrainConfigMismatchError)
        if state is None:
            return
        training = state.get("training") or {}
        self.model.load_state_dict(state["model_state"])
        self.optim.load_state_dict(training)
        self.start_step = int(training["step"])
        self.history = list(training.get("history", []))
        self.failures = {int(k): v for k, v in training.get("failures", {}).items()}
        self.train_seconds = float(training.get("train_seconds", 0.0))
        self.images_seen = int(training.get("images_seen", 0))
        print(f"Resuming {self.config.arch} from {self.last_path} at step {self.start_step}/{self.total_steps}.", file=sys.stderr)

    def loader(self):
        from torch.utils.data import DataLoader

        from detcore.datasets import ViewDataset, collate_views
        from detcore.interrupt import ignore_stop_signals

        workers = self.config.num_workers
        return DataLoader(
            ViewDataset(self.dataset, self.views), batch_sampler=self.sampler, num_workers=workers, collate_fn=collate_views,
            pin_memory=self.device.type == "cuda", worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )

    def hooks(self) -> list[HookBase]:
        return [self.bar, CallbackHook(after_step=self.log), CallbackHook(after_step=self.periodic_eval),
                CheckpointHook(self.save_last, self.config.checkpoint_every)]

    def save_last(self) -> None:
        from detcore.checkpoint import save_checkpoint

        trainer = self.trainer
        training_state = {
            "step": trainer.step,
            **self.optim.state_dict(),
            "config_identity": self.identity,
            "train_config": self.config.to_dict(),
            "history": self.history,
            "failures": {str(k): v for k, v in self.failures.items()},
            "train_seconds": trainer.train_seconds,
            "images_seen": self.images_seen,
        }
        save_checkpoint(self.last_path, self.model, classes=self.dataset.classes, canvas_hw=self.config.canvas, training=training_state)

    def run_step(self, batch: dict[str, Any]) -> None:
        import torch

        for failure in batch["failures"]:
            if failure.image_id not in self.failures:
                self.failures[failure.image_id] = {"path": failure.path, "reason": failure.reason}
                self.bar.write(f"skipping image_id={failure.image_id}: {failure.reason}")
        if batch["images"] is None:
            return
        self.optim.set_lr(self.trainer.step)
        images = batch["images"].to(self.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.optim.autocast:
            outputs = self.model(images)
        gt_boxes = [b.to(self.device) for b in batch["gt_boxes"]]
        gt_labels = [lb.to(self.device) for lb in batch["gt_labels"]]
        losses = self.model.loss(outputs, gt_boxes, gt_labels)
        loss = sum(losses.values())
        if self.optim.step(loss, self.model.parameters()):
            self.window.add(losses, loss)
        self.images_seen += images.shape[0]

    def log(self, trainer: Trainer) -> None:
        if trainer.step % self.config.log_every == 0 or trainer.step == self.total_steps:
            if self.window:
                self.history.append({"step": trainer.step, **self.window.means()})
            self.window.clear()

    def periodic_eval(self, trainer: Trainer) -> None:
        config, step = self.config, trainer.step
        if self.val_dataset is not None and config.eval_every and step % config.eval_every == 0 and step < self.total_steps:
            result = evaluate_model(self.model, self.val_dataset, config.canvas, batch_size=config.batch_size, device=self.device)
            self.periodic_evals.append({"step": step, **result})
            self.bar.write(f"step {step}: AP {result.get('AP', float('nan')):.4f}")
            trainer.reset_timer()

    def postfix(self) -> dict[str, str] | None:
        return progress_postfix(self.window, self.images_seen, self.trainer.train_seconds)

    def summary(self, stopped: bool) -> dict[str, Any]:
        trainer, model = self.trainer, self.model
        return {
            "finished": not stopped,
            "arch": self.config.arch,
            "step": trainer.step,
            "total_steps": self.total_steps,
            "iters_per_epoch": self.iters_per_epoch,
            "epochs": trainer.step / self.iters_per_epoch,
            "train_seconds": round(trainer.train_seconds, 3),
            "images_per_second": round(self.images_seen / trainer.train_seconds, 3) if trainer.train_seconds > 0 else None,
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "history": self.history,
            "periodic_evals": self.periodic_evals,
            "failed_images": [{"image_id": k, **v} for k, v in sorted(self.failures.items())],
            "nonfinite_steps": self.optim.nonfinite_steps,
            "device": str(self.device),
            "config": self.config.to_dict(),
            "detector_config": model.config.to_dict(),
            "classes": list(self.dataset.classes),
            "canvas_hw": list(self.config.canvas),
            "val": None,
        }

    def finish(self, summary: dict[str, Any]) -> None:
        """Final evaluation, ``final.pt`` and ``metrics.json`` of a run that reached its last step."""
        from detcore.checkpoint import save_checkpoint

        config = self.config
        if self.val_dataset is not None:
            summary["val"] = evaluate_model(
                self.model, self.val_dataset, config.canvas, batch_size=config.batch_size, device=self.device, progress=self.progress
            )
        metadata = {k: summary[k] for k in ("step", "train_seconds", "images_per_second", "val") if summary[k] is not None}
        save_checkpoint(self.out_dir / "final.pt", self.model, classes=self.dataset.classes, canvas_hw=config.canvas, metadata=metadata)
        write_json_atomic(self.out_dir / "metrics.json", summary)
        if self.failures:
            ids = ", ".join(str(k) for k in sorted(self.failures))
            print(f"{len(self.failures)} image(s) could not be decoded and were skipped: image_id {ids}", file=sys.stderr)


def train_detector(config: TrainConfig, *, stop_after_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a detector; returns the content of ``metrics.json``.

    Args:
        config: the run.
        stop_after_steps: stop after this many steps *of this call*, with ``last.pt``
            written, as if the process had been killed there (for tests and time-boxed
            jobs); the result then has ``"finished": False``.
        progress: show a tqdm progress bar with the loss and images/s.
    """
    config.validate()
    run = _DetectorRun(config, progress)
    run.trainer = trainer = Trainer(
        run.run_step, run.loader(), run.sampler, run.total_steps, run.hooks(), start_step=run.start_step,
        train_seconds=run.train_seconds, stop_after_steps=stop_after_steps,
    )
    run.model.train()
    stopped = not trainer.train()
    summary = run.summary(stopped)
    if stopped:
        trainer.stop.raise_if_requested(f"{run.last_path} holds step {trainer.step}/{run.total_steps}; re-run the same command to resume")
        return summary
    run.finish(summary)
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
    "OPTIMIZERS",
    "OPTIMIZER_DEFAULTS",
    "TrainConfig",
    "TrainConfigMismatchError",
    "autocast_context",
    "build_optimizer",
    "config_difference",
    "evaluate_detector",
    "evaluate_model",
    "learning_rate_factor",
    "optimizer_step",
    "parse_canvas",
    "resolve_device",
    "train_detector",
)
