"""`distill train`: a student trained against teacher targets with no teacher in the process.

One loop, `train_student`, serves the local run and every Ray Train worker
(`student_trainer.ray_train` passes a `DistContext`). Per step: a batch of stored views
(rendered, hash-checked, targets read in the DataLoader workers), the student forward,
the GFL loss and the enabled distillation recipes (`student_trainer.distill`), one
optimizer over the student and the FGD/HGD modules.

Outputs in ``config.out``:
    run_config.json   the resolved run config (approximations listed)
    metrics.jsonl     one JSON line per ``log_every`` steps (every loss term, lr, img/s)
                      and one per evaluation
    tb/               TensorBoard event files (the same scalars)
    last.pt           resume state, every ``checkpoint_every`` steps and at epoch ends;
                      a detcore checkpoint (``distill detector eval`` loads it)
    final.pt          the trained student (detcore checkpoint; FGD/HGD modules in ``training``)
    results.json      final COCO AP (``coco``), timings, the source, skipped images

Re-running the same command after a kill resumes from ``last.pt`` at the exact step and
position in the epoch; a different configuration in the same folder is refused. Ctrl-C or
SIGTERM ends the current step, writes ``last.pt`` and raises `detcore.interrupt.Interrupted`
(``distill train`` exits 130 / 143).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from detcore.engine import (
    CallbackHook, CheckpointHook, HookBase, ProgressBarHook, Trainer, load_resume_state, write_json_atomic,
)
from detcore.engine import config_identity as engine_identity
from detcore.optim import LossWindow, Optimization, count_steps, progress_postfix
from student_trainer.config import TrainRunConfig

logger = logging.getLogger("student_trainer.train")

# Config keys that may change between a run and its resumption (they do not change the result).
_RESUME_FREE_KEYS = (
    "out",
    "device",
    "num_threads",
    "address",
    "data.num_workers",
    "data.storage_options",
    "data.val_annotations",
    "data.val_images",
    "schedule",
    "source.endpoint",
    "source.token",
    "source.timeout_s",
    "source.max_retries",
)
# Config keys holding local paths (resolved in the identity; URLs stay as written).
_PATH_KEYS = ("data.store", "data.annotations", "data.images", "source.teacher", "student.init", "student.backbone_weights")


class ResumeMismatchError(ValueError):
    """``out/last.pt`` belongs to a run with another configuration."""


@dataclass
class DistContext:
    """How a data-parallel worker differs from a local run (filled by `student_trainer.ray_train`)."""

    rank: int = 0
    """This worker's global rank."""
    world_size: int = 1
    """Number of workers."""
    device: Any = None
    """torch.device of this worker (None: from the run config)."""
    wrap_model: Callable[[Any], Any] | None = None
    """Wraps the `DistillationModel` for data-parallel training (DDP); None: no wrapper."""
    broadcast: Callable[[Any], Any] | None = None
    """Sends a picklable object from rank 0 to every rank and returns it (resume state)."""
    gather: Callable[[Any], list[Any]] | None = None
    """Collects a picklable object from every rank on every rank (failure reports)."""
    on_epoch_end: Callable[[dict[str, Any], Path | None], None] | None = None
    """Called on every rank at each epoch end with metrics (and last.pt on rank 0)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def config_identity(config: TrainRunConfig) -> dict[str, Any]:
    """The settings that define the result (compared on resume), paths resolved."""
    return engine_identity(config.to_record(), resume_free=_RESUME_FREE_KEYS, paths=_PATH_KEYS)


class MetricsLog:
    """metrics.jsonl + TensorBoard + console, written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            # Drop lines past the resumed step: they belong to steps that will run again.
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= resume_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any], scalars: dict[str, float], step: int, prefix: str) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record, sort_keys=True, default=float) + "\n")
        if self.writer is not None:
            for name, value in scalars.items():
                if value is not None and value == value:  # skip NaN (e.g. APl without large objects)
                    self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _resolve_views(config: TrainRunConfig, coco, store_source, canvas_hw, orient: bool = True) -> tuple[list, dict, str]:
    """Views to train on, the stored content hashes, and a note on where they came from."""
    from detcore.views import plan_views

    known = set(coco.image_ids)
    views, hashes = [], {}
    note = ""
    if store_source is not None:
        dropped = set()
        for view, digest in store_source.stored_views():
            if view.image_id not in known:
                dropped.add(view.image_id)
                continue
            views.append(view)
            hashes[view.key] = digest
        if dropped:
            logger.warning("%d image(s) of the store are not in %s and are left out: %s", len(dropped), config.data.annotations,
                           sorted(dropped)[:20])
        note = f"{len(views)} stored views"
    in_store = {v.image_id for v in views}
    if store_source is None or config.source.kind == "read-through":
        missing = [i for i in coco.image_ids if i not in in_store]
        if missing:
            planned = plan_views(
                [(i, coco.record(i).height, coco.record(i).width) for i in missing],
                canvas_hw=canvas_hw, scales=config.data.scales, flip=config.data.flip, orient=orient,
            )
            views += planned
            note += f"{' + ' if note else ''}{len(planned)} planned views of {len(missing)} images not in the store"
    if config.data.max_images is not None:
        keep = set(sorted({v.image_id for v in views})[: config.data.max_images])
        views = [v for v in views if v.image_id in keep]
    views.sort(key=lambda v: v.key)
    return views, hashes, note


def parameter_digest(model: Any) -> str:
    """SHA-256 of every parameter's bytes, in registration order (buffers excluded: BatchNorm's running
    statistics are updated from each rank's own batch after DDP's broadcast)."""
    import hashlib

    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _open_sources(config: TrainRunConfig, classes, device) -> tuple[list[str], Any, Any, Any]:
    """Target names the enabled terms read, the target source (None when no term reads one),
    the store to take views from (None without a store) and the region the targets are read
    from in (`label_store.StoreRegion`; None for a dense store or a source other than the store)."""
    from label_store.schema import LOSS_TARGET_SUBSTITUTES
    from student_trainer.distill import needed_target_names
    from student_trainer.sources import StoreSource, build_source

    losses = config.losses
    available, region = None, None
    if config.data.store:
        reader = StoreSource(config.data.store, [], storage_options=config.data.storage_options).reader
        if config.source.kind in ("store", "read-through"):
            region = reader.region
        if any(term in LOSS_TARGET_SUBSTITUTES for term in losses.enabled):
            # A term with a substitute group (BCD: edges for box) reads what the store holds at every point.
            available = {spec.group for spec in reader.targets}
    region_groups = region.groups if region is not None else ()
    names = needed_target_names(losses, config.student.strides, available, region_groups)
    source = (
        build_source(config, names, device=device, dataset_classes=classes) if names or config.source.kind != "store" else None
    )
    store_for_views = None
    if config.data.store:
        if isinstance(getattr(source, "store", None), StoreSource):
            store_for_views = source.store
        elif isinstance(source, StoreSource):
            store_for_views = source
        else:
            store_for_views = StoreSource(config.data.store, [], storage_options=config.data.storage_options)
    return names, source, store_for_views, region


class _StudentRun:
    """One `train_student` run on one rank: data and targets, model and optimisation, the step and the hooks."""

    def __init__(self, config: TrainRunConfig, dist: DistContext, progress: bool) -> None:
        import torch

        from detcore.train import resolve_device

        self.config, self.dist, self.progress, self.is_main = config, dist, progress, dist.is_main
        self.device = dist.device if dist.device is not None else resolve_device(config.device)
        if config.num_threads:
            torch.set_num_threads(int(config.num_threads))
        self.out = Path(config.out)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out / "last.pt"
        self._setup_data()
        self._build_model()
        optim = config.optim
        self.optim = Optimization(
            self.model, device=self.device, name=optim.optimizer, peak_lr=optim.peak_lr, weight_decay=optim.decay, amp=optim.amp,
            total_steps=self.total_steps, warmup_iters=optim.warmup_iters, grad_clip=optim.grad_clip,
        )
        self.identity = config_identity(config)
        self._resume()
        self.train_model = dist.wrap_model(self.model) if dist.wrap_model is not None else self.model
        if self.is_main:
            self._write_run_config()
        self.log = MetricsLog(self.out, self.is_main, config.schedule.tensorboard, self.start_step)
        self.val_dataset = None
        if self.is_main and config.data.val_annotations:
            from detcore.coco import CocoDataset

            self.val_dataset = CocoDataset(config.data.val_annotations, config.data.val_images)
        self.window, self.history = LossWindow(), []
        self.trainer: Trainer | None = None
        self.bar = ProgressBarHook(
            f"train {config.student.arch} [{','.join(config.losses.enabled) or 'no KD'}]", enabled=progress and self.is_main,
            postfix=self.postfix, dynamic_ncols=True,
        )

    def _setup_data(self) -> None:
        """Source, fingerprint checks, views, dataset and sampler."""
        from detcore.coco import CocoDataset
        from detcore.datasets import CanvasBatchSampler
        from student_trainer.data import StoreViewDataset, check_store_fits, check_store_region

        config, dist = self.config, self.dist
        self.coco = coco = CocoDataset(config.data.annotations, config.data.images)
        self.names, self.source, store_for_views, self.region = _open_sources(config, coco.classes, self.device)
        reference = self.source if self.source is not None else store_for_views
        if reference is None:
            raise ValueError("train_student(config=) expects a store or a target source. Got neither.")
        self.fingerprint = fingerprint = reference.fingerprint
        self.canvas_hw = canvas_hw = tuple(fingerprint.canvas_hw)
        self.teacher_channels = {spec.name: int(spec.shape[0]) for spec in reference.specs}
        check_store_fits(
            fingerprint, reference.specs, store=config.data.store or config.source.endpoint or config.source.teacher or "",
            classes=coco.classes, strides=config.student.strides, reg_max=config.student.reg_max,
            canvas_hw=tuple(config.data.canvas) if config.data.canvas else None, needed=self.names,
        )
        if self.region is not None:
            from detcore.models.gfl import GFLDetector

            check_store_region(
                self.region, config.losses, store=config.data.store, point_offset=GFLDetector.point_offset, needed=self.names
            )
        if store_for_views is not None and store_for_views is not reference:
            _check_same_teacher(config, store_for_views, fingerprint)
        # A store of one non-square canvas (schema 1) had every view fit into that canvas.
        orient = canvas_hw[0] == canvas_hw[1] or store_for_views is None or len(store_for_views.reader.canvases) > 1
        views, hashes, self.views_note = _resolve_views(config, coco, store_for_views, canvas_hw, orient)
        if not views:
            raise ValueError(f"train_student expects views to train on. Got none ({self.views_note or 'empty store'}).")
        worker_reader = self.source.worker_reader() if self.source is not None and self.names else None
        self.dataset = StoreViewDataset(
            coco, views, expected_hashes=hashes, target_reader=worker_reader,
            readable_keys=self.source.readable_keys() if worker_reader is not None else None,
            strict_hash=config.data.strict_hash, photometric=config.data.photometric,
        )
        # Batches of one canvas each (aspect-ratio grouping), the same count on every rank and epoch.
        optim = config.optim
        self.sampler = CanvasBatchSampler(views, optim.batch_size, seed=optim.seed, num_replicas=dist.world_size, rank=dist.rank)
        self.iters_per_epoch = self.sampler.num_batches
        self.total_steps = count_steps(optim.iters, optim.epochs, self.iters_per_epoch)

    def _build_model(self) -> None:
        import torch

        from detcore.checkpoint import load_checkpoint
        from detcore.models.gfl import build_detector
        from student_trainer.distill import DistillationModel

        student_cfg = self.config.student
        torch.manual_seed(self.config.optim.seed)
        self.student = build_detector(
            student_cfg.arch, len(self.coco.classes), fpn_channels=student_cfg.fpn_channels,
            head_channels=student_cfg.head_channels, num_convs=student_cfg.num_convs, reg_max=student_cfg.reg_max,
            strides=student_cfg.strides, backbone_weights=student_cfg.backbone_weights,
            frozen_backbone_bn=None if student_cfg.backbone_weights is None else not student_cfg.train_backbone_all,
        )
        if student_cfg.init:
            self.student.load_state_dict(load_checkpoint(student_cfg.init)["model_state"])
        self.model = DistillationModel(
            self.student, self.config.losses, self.canvas_hw, self.teacher_channels, class_mask=self.fingerprint.class_mask,
            region_groups=self.region.groups if self.region is not None else (),
        ).to(self.device)

    def _resume(self) -> None:
        from student_trainer.data import FailureLog

        state = None
        if self.is_main:
            state = load_resume_state(self.last_path, self.identity, caller="train_student", error=ResumeMismatchError, limit=8)
        if self.dist.broadcast is not None:
            state = self.dist.broadcast(state)
        self.start_step, self.train_seconds, self.images_seen = 0, 0.0, 0
        self.failures, self.evals = FailureLog.empty(), []
        if state is None:
            return
        training = state["training"]
        self.student.load_state_dict(state["model_state"])
        self.model.load_distill_state_dict(training["distill_state"])
        self.optim.load_state_dict(training)
        self.start_step = int(training["step"])
        self.train_seconds = float(training.get("train_seconds", 0.0))
        self.images_seen = int(training.get("images_seen", 0))
        self.evals = list(training.get("evals", []))
        self.failures = FailureLog({int(k): v for k, v in training["failures"]["changed"].items()},
                                   {int(k): v for k, v in training["failures"]["undecodable"].items()})
        if self.is_main:
            print(f"Resuming {self.config.student.arch} from {self.last_path} at step {self.start_step}/{self.total_steps}.",
                  file=sys.stderr)

    def _write_run_config(self) -> None:
        config = self.config
        record = config.to_record()
        record["approximations"] = config.approximations
        record["resolved"] = {
            "canvas_hw": list(self.canvas_hw), "teacher_fingerprint": self.fingerprint.to_dict(), "target_names": self.names,
            "views": self.views_note, "num_images": self.sampler.num_images, "iters_per_epoch": self.iters_per_epoch,
            "total_steps": self.total_steps, "warmup_iters": self.optim.warmup, "world_size": self.dist.world_size,
        }
        write_json_atomic(self.out / "run_config.json", record)
        for note in config.approximations:
            logger.warning("approximation: %s", note)

    def loader(self):
        from torch.utils.data import DataLoader

        from detcore.interrupt import ignore_stop_signals
        from student_trainer.data import collate_train

        workers = self.config.data.num_workers
        # LD's VLR and ld_im's region depend on the GT alone: the loader's workers compute them.
        self.dataset.regions = self.model.region_spec()
        return DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate_train,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )

    def hooks(self) -> list[HookBase]:
        checkpoint = CheckpointHook(self.save_last, self.config.schedule.checkpoint_every, at_epoch_end=True)
        return [self.bar, CallbackHook(after_step=self.log_window), checkpoint, CallbackHook(after_epoch=self.end_epoch)]

    def save_last(self) -> None:
        from detcore.checkpoint import save_checkpoint

        if not self.is_main:
            return
        trainer = self.trainer
        training_state = {
            "kind": "distill.student",
            "step": trainer.step,
            **self.optim.state_dict(),
            "distill_state": self.model.distill_state_dict(),
            "config_identity": self.identity,
            "run_config": self.config.to_record(),
            "train_seconds": trainer.train_seconds,
            "images_seen": self.images_seen,
            "evals": self.evals,
            "failures": self.failures.to_dict(),
        }
        save_checkpoint(self.last_path, self.student, classes=self.coco.classes, canvas_hw=self.canvas_hw, training=training_state)

    def evaluate(self, tag: str) -> dict[str, Any] | None:
        from detcore.train import evaluate_model

        if self.val_dataset is None:
            return None
        step = self.trainer.step
        result = evaluate_model(
            self.student, self.val_dataset, self.canvas_hw, batch_size=self.config.optim.batch_size, device=self.device, progress=False
        )
        entry = {"step": step, "epoch": round(step / self.iters_per_epoch, 3), "tag": tag, **result}
        self.evals.append(entry)
        self.log.write({"step": step, "eval": entry}, {k: result[k] for k in ("AP", "AP50", "AP75") if k in result}, step, "val")
        return result

    def run_step(self, batch: dict[str, Any]) -> None:
        for failure in self.failures.add(batch["failures"]):
            self.bar.write(f"skipping image {failure.image_id}: {failure.reason}")
        if batch["images"] is None:
            return
        device = self.device
        self.optim.set_lr(self.trainer.step)
        images = batch["images"].to(device, non_blocking=True)
        gt_boxes = [b.to(device) for b in batch["gt_boxes"]]
        gt_labels = [lb.to(device) for lb in batch["gt_labels"]]
        teacher = self.source.complete(batch, device=device) if self.names else None
        with self.optim.autocast:
            terms, extras = self.train_model(images, gt_boxes, gt_labels, teacher, batch.get("regions"))
        loss = sum(terms.values())
        if self.optim.step(loss, self.model.parameters()):
            self.window.add({**terms, **extras}, loss)
        else:
            self.bar.write(
                f"step {self.trainer.step}: non-finite loss {float(loss)} skipped ({ {k: float(v) for k, v in terms.items()} })"
            )
        self.images_seen += images.shape[0] * self.dist.world_size
        self.window.num_images += images.shape[0] * self.dist.world_size

    def log_window(self, trainer: Trainer) -> None:
        step, window = trainer.step, self.window
        window.seconds += trainer.step_seconds
        if not (step % self.config.schedule.log_every == 0 or step == self.total_steps):
            return
        if window:
            lr, means = self.optim.lr, window.means()
            img_s = window.num_images / max(window.seconds, 1e-9)
            entry = {"step": step, "epoch": round(step / self.iters_per_epoch, 3), "lr": lr, "img_s": round(img_s, 3), **means}
            self.history.append(entry)
            self.log.write(entry, {**means, "lr": lr, "img_s": img_s}, step, "train")
            if self.is_main:
                line = f"step {step}/{self.total_steps} lr={lr:.2e} img/s={img_s:.1f} " + " ".join(
                    f"{k}={v:.4g}" for k, v in means.items()
                )
                if self.progress:
                    self.bar.write(line)
                else:
                    logger.info("%s", line)
        window.clear()

    def end_epoch(self, trainer: Trainer) -> None:
        step = trainer.step
        if self.source is not None:
            self.source.flush()  # read-through: what this epoch fetched is committed before the next reads
        done_epochs = step // self.iters_per_epoch
        every = self.config.schedule.eval_every
        if every and done_epochs % every == 0 and step < self.total_steps:
            result = self.evaluate(f"epoch {done_epochs}")
            if result is not None:
                self.bar.write(f"epoch {done_epochs} (step {step}): AP {result.get('AP', float('nan')):.4f}")
            trainer.reset_timer()
        if self.dist.on_epoch_end is not None:
            last = self.last_path if self.is_main else None
            self.dist.on_epoch_end({"step": step, "epoch": done_epochs, **(self.history[-1] if self.history else {})}, last)

    def postfix(self) -> dict[str, str] | None:
        return progress_postfix(self.window, self.images_seen, self.trainer.train_seconds)

    def gather_ranks(self) -> list[str]:
        """Every rank's parameter digest; the ranks' failure reports merged into this one's."""
        dist, model = self.dist, self.model
        # Data-parallel ranks must end with bit-identical parameters (DDP averages the gradients).
        digests = dist.gather(parameter_digest(model)) if dist.gather is not None else [parameter_digest(model)]
        if len(set(digests)) > 1:
            logger.error("rank %d: the ranks' parameters differ after step %d (digests %s)", dist.rank, self.trainer.step,
                         [d[:12] for d in digests])
        if dist.gather is not None:
            for report in dist.gather(self.failures.to_dict()):
                for bucket in ("changed", "undecodable"):
                    getattr(self.failures, bucket).update({int(k): v for k, v in report[bucket].items()})
        return digests

    def summary(self, stopped: bool, digests: list[str]) -> dict[str, Any]:
        config, trainer, source = self.config, self.trainer, self.source
        step, train_seconds = trainer.step, trainer.train_seconds
        return {
            "finished": not stopped,
            "student": config.student.arch,
            "losses": list(config.losses.enabled),
            "source": source.describe() if source is not None else {"kind": "none", "store": config.data.store},
            "step": step,
            "resumed_from_step": trainer.start_step,
            "total_steps": self.total_steps,
            "iters_per_epoch": self.iters_per_epoch,
            "epochs": round(step / self.iters_per_epoch, 3),
            "world_size": self.dist.world_size,
            "parameter_digests": digests,
            "train_seconds": round(train_seconds, 3),
            "images_per_second": round(self.images_seen / train_seconds, 3) if train_seconds > 0 else None,
            "num_parameters": int(sum(p.numel() for p in self.student.parameters())),
            "num_distill_parameters": int(sum(p.numel() for p in self.model.distill_modules.parameters())),
            "nonfinite_steps": self.optim.nonfinite_steps,
            "skipped_images": self.failures.to_dict(),
            "approximations": config.approximations,
            "device": str(self.device),
            "canvas_hw": list(self.canvas_hw),
            "teacher_fingerprint": self.fingerprint.to_dict(),
            "evals": self.evals,
            "coco": None,
            "config": config.to_record(),
        }

    def finish(self, summary: dict[str, Any]) -> None:
        """Final COCO AP, ``final.pt`` and ``results.json`` of a run that reached its last step (rank 0)."""
        from detcore.checkpoint import save_checkpoint

        config, out = self.config, self.out
        summary["coco"] = self.evaluate("final")
        metadata = {k: summary[k] for k in ("step", "train_seconds", "images_per_second", "losses") if summary[k] is not None}
        if summary["coco"] is not None:
            metadata["val"] = summary["coco"]
        training = {"kind": "distill.student.final", "distill_state": self.model.distill_state_dict(), "run_config": config.to_record()}
        save_checkpoint(out / "final.pt", self.student, classes=self.coco.classes, canvas_hw=self.canvas_hw, metadata=metadata,
                        training=training)
        write_json_atomic(out / "results.json", summary)
        self.log.close()
        if self.failures.count:
            print(self.failures.summary(), file=sys.stderr)
        if summary["coco"] is not None:
            print(f"final COCO AP {summary['coco'].get('AP', float('nan')):.4f} "
                  f"(AP50 {summary['coco'].get('AP50', float('nan')):.4f}) -> {out / 'results.json'}", file=sys.stderr)


def _check_same_teacher(config: TrainRunConfig, store_for_views, fingerprint) -> None:
    """The store the views come from must hold the targets of the source's teacher."""
    from student_trainer.sources import TeacherMismatchError

    differences = store_for_views.fingerprint.diff(fingerprint)
    if differences:
        raise TeacherMismatchError(
            f"train_student expects the {config.source.kind} teacher to be the store's teacher ({config.data.store}). "
            "Differences:\n  - " + "\n  - ".join(differences)
        )


def train_student(
    config: TrainRunConfig,
    *,
    dist: DistContext | None = None,
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a student; returns the content of ``results.json``.

    Args:
        config: the run (`student_trainer.config.build_run_config`).
        dist: data-parallel context (Ray Train workers); None for a local run.
        stop_after_steps: stop after this many steps of this call with ``last.pt`` written,
            as if killed there (tests, time-boxed jobs); the result has ``finished`` False.
        progress: tqdm progress bar with the loss and images/s.

    Raises:
        student_trainer.data.StoreFitError: the store does not fit the student or the data.
        label_store.FingerprintMismatchError, TeacherMismatchError: teachers differ.
        ResumeMismatchError: ``out/last.pt`` holds another run.
    """
    run = _StudentRun(config, dist or DistContext(), progress)
    run.trainer = trainer = Trainer(
        run.run_step, run.loader(), run.sampler, run.total_steps, run.hooks(), start_step=run.start_step,
        train_seconds=run.train_seconds, stop_after_steps=stop_after_steps,
    )
    run.model.train()
    stopped = not trainer.train()
    summary = run.summary(stopped, run.gather_ranks())
    if run.source is not None:
        run.source.close()
    if stopped or not run.is_main:
        run.log.close()
        trainer.stop.raise_if_requested(f"{run.last_path} holds step {trainer.step}/{run.total_steps}; re-run the same command to resume")
        return summary
    run.finish(summary)
    return summary
