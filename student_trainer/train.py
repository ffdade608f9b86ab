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

from detcore.engine import CallbackHook, CheckpointHook, ProgressBarHook, Trainer, load_resume_state, write_json_atomic
from detcore.engine import config_identity as engine_identity
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
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from detcore.checkpoint import load_checkpoint, save_checkpoint
    from detcore.coco import CocoDataset
    from detcore.models.gfl import build_detector
    from detcore.train import (
        OPTIMIZER_DEFAULTS, autocast_context, build_optimizer, evaluate_model, learning_rate_factor, optimizer_step,
        resolve_device,
    )
    from detcore.datasets import CanvasBatchSampler
    from detcore.interrupt import ignore_stop_signals
    from student_trainer.data import FailureLog, StoreViewDataset, check_store_fits, check_store_region, collate_train
    from student_trainer.distill import DistillationModel, needed_target_names
    from student_trainer.sources import StoreSource, build_source

    dist = dist or DistContext()
    is_main = dist.is_main
    device = dist.device if dist.device is not None else resolve_device(config.device)
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    out = Path(config.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    last_path, final_path = out / "last.pt", out / "final.pt"
    student_cfg, optim, losses = config.student, config.optim, config.losses

    # -- data, source, fingerprint check -----------------------------------------------
    coco = CocoDataset(config.data.annotations, config.data.images)
    available, region = None, None
    if config.data.store:
        store_reader = StoreSource(config.data.store, [], storage_options=config.data.storage_options).reader
        region = store_reader.region
        if losses.uses("bcd"):
            # BCD reads the teacher's edge distances when the store holds no edge distributions at every point.
            available = {spec.group for spec in store_reader.targets}
    region_groups = region.groups if region is not None and config.source.kind in ("store", "read-through") else ()
    names = needed_target_names(losses, student_cfg.strides, available, region_groups)
    source = (
        build_source(config, names, device=device, dataset_classes=coco.classes) if names or config.source.kind != "store" else None
    )
    store_for_views = None
    if config.data.store:
        if isinstance(getattr(source, "store", None), StoreSource):
            store_for_views = source.store
        elif isinstance(source, StoreSource):
            store_for_views = source
        else:
            store_for_views = StoreSource(config.data.store, [], storage_options=config.data.storage_options)
    reference = source if source is not None else store_for_views
    if reference is None:
        raise ValueError("train_student(config=) expects a store or a target source. Got neither.")
    fingerprint = reference.fingerprint
    canvas_hw = tuple(fingerprint.canvas_hw)
    check_store_fits(
        fingerprint, reference.specs, store=config.data.store or config.source.endpoint or config.source.teacher or "",
        classes=coco.classes, strides=student_cfg.strides, reg_max=student_cfg.reg_max,
        canvas_hw=tuple(config.data.canvas) if config.data.canvas else None, needed=names,
    )
    if region is not None and config.source.kind in ("store", "read-through"):
        from detcore.models.gfl import GFLDetector

        check_store_region(region, losses, store=config.data.store, point_offset=GFLDetector.point_offset, needed=names)
    if store_for_views is not None and store_for_views is not reference:
        differences = store_for_views.fingerprint.diff(fingerprint)
        if differences:
            from student_trainer.sources import TeacherMismatchError

            raise TeacherMismatchError(
                f"train_student expects the {config.source.kind} teacher to be the store's teacher ({config.data.store}). "
                "Differences:\n  - " + "\n  - ".join(differences)
            )
    # A store of one non-square canvas (schema 1) had every view fit into that canvas.
    orient = canvas_hw[0] == canvas_hw[1] or store_for_views is None or len(store_for_views.reader.canvases) > 1
    views, hashes, views_note = _resolve_views(config, coco, store_for_views, canvas_hw, orient)
    if not views:
        raise ValueError(f"train_student expects views to train on. Got none ({views_note or 'empty store'}).")
    worker_reader = source.worker_reader() if source is not None and names else None
    dataset = StoreViewDataset(
        coco, views, expected_hashes=hashes, target_reader=worker_reader,
        readable_keys=source.readable_keys() if worker_reader is not None else None,
        strict_hash=config.data.strict_hash, photometric=config.data.photometric,
    )
    # Batches of one canvas each (aspect-ratio grouping), the same count on every rank and epoch.
    sampler = CanvasBatchSampler(views, optim.batch_size, seed=optim.seed, num_replicas=dist.world_size, rank=dist.rank)
    iters_per_epoch = sampler.num_batches
    total_steps = int(optim.iters) if optim.iters is not None else int(optim.epochs) * iters_per_epoch
    warmup = int(optim.warmup_iters) if optim.warmup_iters is not None else min(500, total_steps // 10)
    schedule = OPTIMIZER_DEFAULTS[optim.optimizer]["schedule"]

    # -- model, distillation modules, optimizer ----------------------------------------
    torch.manual_seed(optim.seed)
    student = build_detector(
        student_cfg.arch, len(coco.classes), fpn_channels=student_cfg.fpn_channels, head_channels=student_cfg.head_channels,
        num_convs=student_cfg.num_convs, reg_max=student_cfg.reg_max, strides=student_cfg.strides,
        backbone_weights=student_cfg.backbone_weights,
        frozen_backbone_bn=None if student_cfg.backbone_weights is None else not student_cfg.train_backbone_all,
    )
    if student_cfg.init:
        student.load_state_dict(load_checkpoint(student_cfg.init)["model_state"])
    teacher_channels = {spec.name: int(spec.shape[0]) for spec in reference.specs}
    model = DistillationModel(
        student, losses, canvas_hw, teacher_channels, class_mask=fingerprint.class_mask,
        region_groups=region_groups,
    ).to(device)
    optimizer = build_optimizer(model, optim.optimizer, optim.peak_lr, optim.decay)
    autocast, use_scaler = autocast_context(device, optim.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    # -- resume ------------------------------------------------------------------------
    identity = config_identity(config)
    state = None
    if is_main:
        state = load_resume_state(last_path, identity, caller="train_student", error=ResumeMismatchError, limit=8)
    if dist.broadcast is not None:
        state = dist.broadcast(state)
    step, history, train_seconds, images_seen, nonfinite_steps = 0, [], 0.0, 0, 0
    failures = FailureLog.empty()
    evals: list[dict[str, Any]] = []
    if state is not None:
        training = state["training"]
        student.load_state_dict(state["model_state"])
        model.load_distill_state_dict(training["distill_state"])
        optimizer.load_state_dict(training["optimizer"])
        if training.get("scaler"):
            scaler.load_state_dict(training["scaler"])
        torch.set_rng_state(training["torch_rng"])
        step = int(training["step"])
        train_seconds = float(training.get("train_seconds", 0.0))
        images_seen = int(training.get("images_seen", 0))
        nonfinite_steps = int(training.get("nonfinite_steps", 0))
        evals = list(training.get("evals", []))
        failures = FailureLog({int(k): v for k, v in training["failures"]["changed"].items()},
                              {int(k): v for k, v in training["failures"]["undecodable"].items()})
        if is_main:
            print(f"Resuming {student_cfg.arch} from {last_path} at step {step}/{total_steps}.", file=sys.stderr)
    train_model = dist.wrap_model(model) if dist.wrap_model is not None else model

    def save_last() -> None:
        if not is_main:
            return
        training_state = {
            "kind": "distill.student",
            "step": trainer.step,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None,
            "torch_rng": torch.get_rng_state(),
            "distill_state": model.distill_state_dict(),
            "config_identity": identity,
            "run_config": config.to_record(),
            "train_seconds": trainer.train_seconds,
            "images_seen": images_seen,
            "nonfinite_steps": nonfinite_steps,
            "evals": evals,
            "failures": failures.to_dict(),
        }
        save_checkpoint(last_path, student, classes=coco.classes, canvas_hw=canvas_hw, training=training_state)

    if is_main:
        record = config.to_record()
        record["approximations"] = config.approximations
        record["resolved"] = {
            "canvas_hw": list(canvas_hw), "teacher_fingerprint": fingerprint.to_dict(), "target_names": names,
            "views": views_note, "num_images": sampler.num_images, "iters_per_epoch": iters_per_epoch,
            "total_steps": total_steps, "warmup_iters": warmup, "world_size": dist.world_size,
        }
        write_json_atomic(out / "run_config.json", record)
        for note in config.approximations:
            logger.warning("approximation: %s", note)
    log = MetricsLog(out, is_main, config.schedule.tensorboard, step)
    val_dataset = None
    if is_main and config.data.val_annotations:
        val_dataset = CocoDataset(config.data.val_annotations, config.data.val_images)

    num_workers = config.data.num_workers
    # LD's VLR and ld_im's region depend on the GT alone: the loader's workers compute them.
    dataset.regions = model.region_spec()
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_train,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )

    def evaluate(tag: str) -> dict[str, Any] | None:
        if val_dataset is None:
            return None
        step = trainer.step
        result = evaluate_model(student, val_dataset, canvas_hw, batch_size=optim.batch_size, device=device, progress=False)
        entry = {"step": step, "epoch": round(step / iters_per_epoch, 3), "tag": tag, **result}
        evals.append(entry)
        log.write({"step": step, "eval": entry}, {k: result[k] for k in ("AP", "AP50", "AP75") if k in result}, step, "val")
        return result

    window: dict[str, list[float]] = {}
    current = {"lr": None, "window_images": 0, "window_seconds": 0.0}

    def run_step(batch: dict[str, Any]) -> None:
        nonlocal nonfinite_steps, images_seen
        for failure in failures.add(batch["failures"]):
            bar.write(f"skipping image {failure.image_id}: {failure.reason}")
        if batch["images"] is None:
            return
        lr = current["lr"] = optim.peak_lr * learning_rate_factor(trainer.step, total_steps, warmup, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = batch["images"].to(device, non_blocking=True)
        gt_boxes = [b.to(device) for b in batch["gt_boxes"]]
        gt_labels = [lb.to(device) for lb in batch["gt_labels"]]
        teacher = source.complete(batch, device=device) if names else None
        regions = batch.get("regions")
        with autocast:
            terms, extras = train_model(images, gt_boxes, gt_labels, teacher, regions)
        loss = sum(terms.values())
        if optimizer_step(loss, optimizer, scaler, model.parameters(), optim.grad_clip):
            for key, value in {**terms, **extras}.items():
                window.setdefault(key, []).append(float(value.detach()))
            window.setdefault("loss", []).append(float(loss.detach()))
        else:
            nonfinite_steps += 1
            bar.write(f"step {trainer.step}: non-finite loss {float(loss)} skipped ({ {k: float(v) for k, v in terms.items()} })")
        images_seen += images.shape[0] * dist.world_size
        current["window_images"] += images.shape[0] * dist.world_size

    def log_window(trainer: Trainer) -> None:
        step = trainer.step
        current["window_seconds"] += trainer.step_seconds
        if not (step % config.schedule.log_every == 0 or step == total_steps):
            return
        if window:
            lr = current["lr"]
            means = {k: float(np.mean(v)) for k, v in window.items()}
            img_s = current["window_images"] / max(current["window_seconds"], 1e-9)
            entry = {"step": step, "epoch": round(step / iters_per_epoch, 3), "lr": lr, "img_s": round(img_s, 3), **means}
            history.append(entry)
            log.write(entry, {**means, "lr": lr, "img_s": img_s}, step, "train")
            if is_main:
                line = f"step {step}/{total_steps} lr={lr:.2e} img/s={img_s:.1f} " + " ".join(f"{k}={v:.4g}" for k, v in means.items())
                if progress:
                    bar.write(line)
                else:
                    logger.info("%s", line)
        window.clear()
        current["window_images"], current["window_seconds"] = 0, 0.0

    def end_epoch(trainer: Trainer) -> None:
        step = trainer.step
        if source is not None:
            source.flush()  # read-through: what this epoch fetched is committed before the next reads
        done_epochs = step // iters_per_epoch
        every = config.schedule.eval_every
        if every and done_epochs % every == 0 and step < total_steps:
            result = evaluate(f"epoch {done_epochs}")
            if result is not None:
                bar.write(f"epoch {done_epochs} (step {step}): AP {result.get('AP', float('nan')):.4f}")
            trainer.reset_timer()
        if dist.on_epoch_end is not None:
            dist.on_epoch_end({"step": step, "epoch": done_epochs, **(history[-1] if history else {})}, last_path if is_main else None)

    def postfix() -> dict[str, str] | None:
        if not window.get("loss"):
            return None
        return {"loss": f"{window['loss'][-1]:.3f}", "img_s": f"{images_seen / max(trainer.train_seconds, 1e-9):.1f}"}

    bar = ProgressBarHook(f"train {student_cfg.arch} [{','.join(losses.enabled) or 'no KD'}]", enabled=progress and is_main,
                          postfix=postfix, dynamic_ncols=True)
    hooks = [bar, CallbackHook(after_step=log_window), CheckpointHook(save_last, config.schedule.checkpoint_every, at_epoch_end=True),
             CallbackHook(after_epoch=end_epoch)]
    trainer = Trainer(run_step, loader, sampler, total_steps, hooks, start_step=step, train_seconds=train_seconds,
                      stop_after_steps=stop_after_steps)
    model.train()
    stopped = not trainer.train()
    step, start_step, train_seconds, stop = trainer.step, trainer.start_step, trainer.train_seconds, trainer.stop

    # Data-parallel ranks must end with bit-identical parameters (DDP averages the gradients).
    digests = dist.gather(parameter_digest(model)) if dist.gather is not None else [parameter_digest(model)]
    if len(set(digests)) > 1:
        logger.error("rank %d: the ranks' parameters differ after step %d (digests %s)", dist.rank, step, [d[:12] for d in digests])
    if dist.gather is not None:
        for report in dist.gather(failures.to_dict()):
            for bucket in ("changed", "undecodable"):
                getattr(failures, bucket).update({int(k): v for k, v in report[bucket].items()})
    summary: dict[str, Any] = {
        "finished": not stopped,
        "student": student_cfg.arch,
        "losses": list(losses.enabled),
        "source": source.describe() if source is not None else {"kind": "none", "store": config.data.store},
        "step": step,
        "resumed_from_step": start_step,
        "total_steps": total_steps,
        "iters_per_epoch": iters_per_epoch,
        "epochs": round(step / iters_per_epoch, 3),
        "world_size": dist.world_size,
        "parameter_digests": digests,
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(images_seen / train_seconds, 3) if train_seconds > 0 else None,
        "num_parameters": int(sum(p.numel() for p in student.parameters())),
        "num_distill_parameters": int(sum(p.numel() for p in model.distill_modules.parameters())),
        "nonfinite_steps": nonfinite_steps,
        "skipped_images": failures.to_dict(),
        "approximations": config.approximations,
        "device": str(device),
        "canvas_hw": list(canvas_hw),
        "teacher_fingerprint": fingerprint.to_dict(),
        "evals": evals,
        "coco": None,
        "config": config.to_record(),
    }
    if source is not None:
        source.close()
    if stopped or not is_main:
        log.close()
        stop.raise_if_requested(f"{last_path} holds step {step}/{total_steps}; re-run the same command to resume")
        return summary
    summary["coco"] = evaluate("final")
    metadata = {k: summary[k] for k in ("step", "train_seconds", "images_per_second", "losses") if summary[k] is not None}
    if summary["coco"] is not None:
        metadata["val"] = summary["coco"]
    save_checkpoint(
        final_path, student, classes=coco.classes, canvas_hw=canvas_hw, metadata=metadata,
        training={"kind": "distill.student.final", "distill_state": model.distill_state_dict(), "run_config": config.to_record()},
    )
    write_json_atomic(out / "results.json", summary)
    log.close()
    if failures.count:
        print(failures.summary(), file=sys.stderr)
    if summary["coco"] is not None:
        print(f"final COCO AP {summary['coco'].get('AP', float('nan')):.4f} "
              f"(AP50 {summary['coco'].get('AP50', float('nan')):.4f}) -> {out / 'results.json'}", file=sys.stderr)
    return summary
