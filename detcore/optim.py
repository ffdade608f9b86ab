"""The optimisation both training loops share: optimizer, learning-rate schedule, mixed precision, step.

`Optimization` holds a run's optimizer with its schedule (linear warm-up, then cosine or
mmdetection's step decay), its autocast context and gradient scaler, and the count of steps
skipped for a non-finite loss; `state_dict` / `load_state_dict` are what ``last.pt`` keeps of
it. `LossWindow` collects the loss terms of the steps between two log lines. Nothing here
imports torch at module import (run configs read `OPTIMIZER_DEFAULTS` without it).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

OPTIMIZERS = ("adamw", "sgd")
OPTIMIZER_DEFAULTS = {
    "adamw": {"schedule": "cosine", "lr": 2e-3, "weight_decay": 0.05},
    "sgd": {"schedule": "step", "lr": 0.01, "weight_decay": 1e-4},
}
"""Per optimizer: its learning-rate schedule (warm-up, then cosine or mmdetection's 1x step
decay) and the peak learning rate and weight decay used when none is given."""


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


def count_steps(iters: int | None, epochs: int, iters_per_epoch: int) -> int:
    """Steps of a run: ``iters`` when given, else ``epochs`` passes of ``iters_per_epoch``."""
    return int(iters) if iters is not None else int(epochs) * int(iters_per_epoch)


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


class Optimization:
    """A run's optimizer, learning-rate schedule, autocast and gradient scaler.

    Args:
        model: whose trainable parameters are optimised (build it on its device first).
        device: the training device (autocast and the scaler apply on CUDA only).
        name: ``adamw`` or ``sgd`` (`OPTIMIZER_DEFAULTS` gives its schedule).
        peak_lr, weight_decay: of the run.
        amp: mixed precision on CUDA.
        total_steps: steps of the whole run (the schedule's length).
        warmup_iters: linear warm-up steps; None: min(500, 10 % of the run).
        grad_clip: max global gradient norm; None: no clipping.
    """

    def __init__(
        self, model, *, device, name: str, peak_lr: float, weight_decay: float, amp: bool, total_steps: int,
        warmup_iters: int | None, grad_clip: float | None,
    ) -> None:
        import torch

        self.optimizer = build_optimizer(model, name, peak_lr, weight_decay)
        self.autocast, self.use_scaler = autocast_context(device, amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.peak_lr, self.total_steps, self.grad_clip = peak_lr, int(total_steps), grad_clip
        self.warmup = int(warmup_iters) if warmup_iters is not None else min(500, self.total_steps // 10)
        self.schedule = OPTIMIZER_DEFAULTS[name]["schedule"]
        self.lr: float | None = None
        """Learning rate of the last step."""
        self.nonfinite_steps = 0
        """Steps skipped because their loss was not finite."""

    def set_lr(self, step: int) -> float:
        """Set the learning rate of ``step`` (0-based) on every parameter group; returns it."""
        self.lr = self.peak_lr * learning_rate_factor(step, self.total_steps, self.warmup, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        return self.lr

    def step(self, loss, parameters: Iterable[Any]) -> bool:
        """`optimizer_step` on ``loss``; False (and counted) when the loss was not finite."""
        if optimizer_step(loss, self.optimizer, self.scaler, parameters, self.grad_clip):
            return True
        self.nonfinite_steps += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        """What resumes the optimisation: optimizer, scaler, torch's RNG, the non-finite count."""
        import torch

        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_scaler else None,
            "torch_rng": torch.get_rng_state(),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, training: Mapping[str, Any]) -> None:
        """Restore from a checkpoint's ``training`` dict (`state_dict`'s keys)."""
        import torch

        self.optimizer.load_state_dict(training["optimizer"])
        if training.get("scaler"):
            self.scaler.load_state_dict(training["scaler"])
        torch.set_rng_state(training["torch_rng"])
        self.nonfinite_steps = int(training.get("nonfinite_steps", 0))


class LossWindow:
    """The loss terms of the steps since the last log line, and the images those steps saw."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.num_images = 0
        self.seconds = 0.0

    def __bool__(self) -> bool:
        return bool(self.values)

    def add(self, terms: Mapping[str, Any], loss) -> None:
        """Record one step's terms (tensors or numbers) and its total ``loss``."""
        for key, value in terms.items():
            self.values.setdefault(key, []).append(float(value.detach()))
        self.values.setdefault("loss", []).append(float(loss.detach()))

    @property
    def last_loss(self) -> float | None:
        losses = self.values.get("loss")
        return losses[-1] if losses else None

    def means(self) -> dict[str, float]:
        """Mean of every term over the window."""
        import numpy as np

        return {key: float(np.mean(values)) for key, values in self.values.items()}

    def clear(self) -> None:
        self.values.clear()
        self.num_images, self.seconds = 0, 0.0


def progress_postfix(window: LossWindow, images_seen: int, train_seconds: float) -> dict[str, str] | None:
    """Progress-bar fields: the last step's loss and the run's images per second (None before a loss)."""
    if window.last_loss is None:
        return None
    return {"loss": f"{window.last_loss:.3f}", "img_s": f"{images_seen / max(train_seconds, 1e-9):.1f}"}


__all__ = (
    "OPTIMIZERS",
    "OPTIMIZER_DEFAULTS",
    "LossWindow",
    "Optimization",
    "autocast_context",
    "build_optimizer",
    "count_steps",
    "learning_rate_factor",
    "optimizer_step",
    "progress_postfix",
)
