"""The training loop that `detcore.train.train_detector` and `student_trainer.train.train_student` share.

A `Trainer` walks the steps of a run in epochs of a canvas-grouped batch sampler (a resumed
run starts mid-epoch, at the batch where it stopped), calls the model's ``run_step`` on
each batch and hands control to its hooks (detectron2's ``TrainerBase`` shape): after every
step, at every epoch end (and at the last step), when the run stops early, and at the end.
Checkpointing, evaluation, metrics logging and the progress bar are hooks; the loop itself
owns the step count, the training time and Ctrl-C / SIGTERM (`detcore.interrupt.StopRequest`:
the current step ends, the hooks write resumable state, the caller raises `Interrupted`).

Also here, for both loops: `write_json_atomic` and the resume check (`config_identity`,
`config_difference`, `load_resume_state`); the optimizer, schedule and step they share are
`detcore.optim`. Each loop is a short function over a run object whose methods are its setup,
resume, ``run_step`` and hooks (`detcore.train._DetectorRun`, `student_trainer.train._StudentRun`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


def write_json_atomic(path: str | os.PathLike, data: Any, *, compact: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary beside it, then ``os.replace``).

    Keys sorted; indented by 2 (``compact``: no whitespace); values JSON cannot hold are written as ``str``.
    """
    path = Path(path)
    if compact:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    else:
        text = json.dumps(data, indent=2, sort_keys=True, default=str)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_identity(record: dict[str, Any], *, resume_free: Iterable[str], paths: Iterable[str]) -> dict[str, Any]:
    """The settings of a run that define its result, compared when it resumes.

    Args:
        record: the run's configuration; nested dicts are flattened to dotted keys (``data.store``).
        resume_free: keys that may change between a run and its resumption (a key also frees
            every key below it); they are left out.
        paths: keys holding local paths, resolved (URLs such as ``s3://...`` stay as written).
    """
    free, path_keys = tuple(resume_free), set(paths)
    out = {}
    for key, value in _flatten(record).items():
        if any(key == name or key.startswith(name + ".") for name in free):
            continue
        if key in path_keys and value and "://" not in str(value):
            value = str(Path(value).resolve())
        out[key] = value
    return out


def config_difference(saved: dict[str, Any] | None, now: dict[str, Any], limit: int | None = None) -> str:
    """``different [keys] (saved [...], now [...])``: what keeps a run from resuming (at most ``limit`` keys)."""
    saved = saved or {}
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))[:limit]
    return f"different {keys} (saved {[saved.get(k) for k in keys]}, now {[now.get(k) for k in keys]})"


def load_resume_state(
    last_path: Path, identity: dict[str, Any], *, caller: str, error: type[Exception], limit: int | None = None
) -> dict[str, Any] | None:
    """The checkpoint in ``last_path`` to resume from (None when there is none).

    Raises:
        error: the checkpoint's ``training["config_identity"]`` is not ``identity`` (the
            message names ``caller`` and the differing keys, at most ``limit``).
    """
    from detcore.checkpoint import load_checkpoint

    if not last_path.exists():
        return None
    state = load_checkpoint(last_path, map_location="cpu")
    saved = (state.get("training") or {}).get("config_identity")
    if saved != identity:
        raise error(
            f"{caller}(config=) expects the configuration of the run in {str(last_path.parent)!r} to resume it. "
            f"Got {config_difference(saved, identity, limit=limit)}; use another --out or delete {str(last_path)!r}."
        )
    return state


class HookBase:
    """One concern of a training run (checkpoint, evaluation, logging); every method is optional."""

    def before_train(self, trainer: "Trainer") -> None:
        """Before the first step of this call."""

    def after_step(self, trainer: "Trainer") -> None:
        """After every step (``trainer.step`` already counts it)."""

    def after_epoch(self, trainer: "Trainer") -> None:
        """After the step that ends an epoch, and after the last step of the run."""

    def on_stop(self, trainer: "Trainer") -> None:
        """The run stops before its last step (a signal, or ``stop_after_steps``): keep what resumes it."""

    def after_train(self, trainer: "Trainer") -> None:
        """At the end of `Trainer.train`, also when a step raised."""


class CallbackHook(HookBase):
    """A hook from plain functions of the trainer (None: nothing at that point)."""

    def __init__(
        self,
        *,
        before_train: Callable[["Trainer"], None] | None = None,
        after_step: Callable[["Trainer"], None] | None = None,
        after_epoch: Callable[["Trainer"], None] | None = None,
        on_stop: Callable[["Trainer"], None] | None = None,
        after_train: Callable[["Trainer"], None] | None = None,
    ) -> None:
        self._before_train, self._after_step, self._after_epoch = before_train, after_step, after_epoch
        self._on_stop, self._after_train = on_stop, after_train

    def before_train(self, trainer: "Trainer") -> None:
        if self._before_train is not None:
            self._before_train(trainer)

    def after_step(self, trainer: "Trainer") -> None:
        if self._after_step is not None:
            self._after_step(trainer)

    def after_epoch(self, trainer: "Trainer") -> None:
        if self._after_epoch is not None:
            self._after_epoch(trainer)

    def on_stop(self, trainer: "Trainer") -> None:
        if self._on_stop is not None:
            self._on_stop(trainer)

    def after_train(self, trainer: "Trainer") -> None:
        if self._after_train is not None:
            self._after_train(trainer)


class CheckpointHook(HookBase):
    """Writes resumable state (``save()``: ``last.pt``) every ``every`` steps, at the last step,
    at epoch ends when ``at_epoch_end``, and when the run stops early."""

    def __init__(self, save: Callable[[], None], every: int, *, at_epoch_end: bool = False) -> None:
        self.save, self.every, self.at_epoch_end = save, int(every), at_epoch_end

    def after_step(self, trainer: "Trainer") -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.total_steps or (self.at_epoch_end and trainer.epoch_done):
            self.save()

    def on_stop(self, trainer: "Trainer") -> None:
        self.save()


class ProgressBarHook(HookBase):
    """A tqdm bar over the run's steps; ``postfix()`` gives its fields after each step (None: none)."""

    def __init__(self, desc: str, *, enabled: bool, postfix: Callable[[], dict[str, str] | None], **tqdm_args: Any) -> None:
        self.desc, self.enabled, self.postfix, self.tqdm_args = desc, enabled, postfix, tqdm_args
        self.bar = None

    def before_train(self, trainer: "Trainer") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=self.desc, unit="step", disable=not self.enabled,
                        **self.tqdm_args)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar."""
        from tqdm import tqdm

        (self.bar or tqdm).write(line)

    def after_step(self, trainer: "Trainer") -> None:
        self.bar.update(1)
        fields = self.postfix()
        if fields:
            self.bar.set_postfix(**fields)

    def after_train(self, trainer: "Trainer") -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """Runs ``run_step`` over the batches of ``loader`` from ``start_step`` to ``total_steps``.

    Args:
        run_step: trains on one batch (``trainer.step`` is the step's 0-based index).
        loader: a DataLoader whose ``batch_sampler`` is ``sampler``.
        sampler: a `detcore.datasets.CanvasBatchSampler` (``num_batches`` per epoch;
            ``set_epoch(epoch, start=)`` skips the batches a resumed run has done).
        total_steps: steps of the whole run.
        hooks: called in order at each point (see `HookBase`).
        start_step: steps done before this call (a resumed run).
        train_seconds: seconds of those steps.
        stop_after_steps: stop after this many steps of this call, as if interrupted there.
    """

    def __init__(
        self,
        run_step: Callable[[Any], None],
        loader: Iterable[Any],
        sampler: Any,
        total_steps: int,
        hooks: Sequence[HookBase],
        *,
        start_step: int = 0,
        train_seconds: float = 0.0,
        stop_after_steps: int | None = None,
    ) -> None:
        self.run_step, self.loader, self.sampler, self.hooks = run_step, loader, sampler, list(hooks)
        self.total_steps, self.iters_per_epoch = int(total_steps), int(sampler.num_batches)
        self.step = self.start_step = int(start_step)
        self.stop_after_steps = stop_after_steps
        self.train_seconds = float(train_seconds)
        """Seconds spent in steps, from ``train_seconds`` before this call (evaluation excluded, see `reset_timer`)."""
        self.step_seconds = 0.0
        """Seconds of the last step."""
        self.stopped = False
        """The run stopped before its last step."""
        self.stop = None
        """The `detcore.interrupt.StopRequest` of the run (set by `train`)."""
        self._tick = 0.0

    @property
    def epoch_done(self) -> bool:
        """The last step ended an epoch."""
        return self.step % self.iters_per_epoch == 0

    def reset_timer(self) -> None:
        """Leave the time since the last step (an evaluation) out of the next step's time."""
        self._tick = time.perf_counter()

    def train(self) -> bool:
        """Run the steps (once per trainer); returns True when the run reached ``total_steps`` (False: stopped early)."""
        from detcore.interrupt import StopRequest

        self.stop = StopRequest().install()  # Ctrl-C / SIGTERM: end the step, write last.pt, exit 130 / 143
        try:
            for hook in self.hooks:
                hook.before_train(self)
            while self.step < self.total_steps and not self.stopped:
                self._run_epoch()
        finally:
            self.stop.restore()
            for hook in self.hooks:
                hook.after_train(self)
            # Let go of the loader (persistent DataLoader workers) and the hooks now: closures that
            # refer back to this trainer would otherwise hold them until garbage collection.
            self.loader, self.run_step, self.hooks = (), None, []
        return not self.stopped

    def _run_epoch(self) -> None:
        epoch, within = divmod(self.step, self.iters_per_epoch)
        self.sampler.set_epoch(epoch, start=within)
        self.reset_timer()
        for batch in self.loader:
            self.run_step(batch)
            self.step += 1
            now = time.perf_counter()
            self.step_seconds = now - self._tick
            self.train_seconds += self.step_seconds
            self._tick = now
            for hook in self.hooks:
                hook.after_step(self)
            epoch_done = self.epoch_done
            if epoch_done or self.step == self.total_steps:
                for hook in self.hooks:
                    hook.after_epoch(self)
            time_boxed = self.stop_after_steps is not None and self.step - self.start_step >= self.stop_after_steps
            if self.step < self.total_steps and (self.stop.requested or time_boxed):
                for hook in self.hooks:
                    hook.on_stop(self)
                self.stopped = True
                return
            if self.step >= self.total_steps or epoch_done:
                return


__all__ = (
    "CallbackHook",
    "CheckpointHook",
    "HookBase",
    "ProgressBarHook",
    "Trainer",
    "config_difference",
    "config_identity",
    "load_resume_state",
    "write_json_atomic",
)
