"""What one precompute run did: `PrecomputeSummary` and its end-of-run table.

Stage seconds in `PrecomputeSummary` are worker-seconds summed over tasks (decode:
decoding and rendering; forward: the teacher's forward pass; encode: device-to-host copy
and dtype cast of the outputs; write: codec encoding, compression and the part commit),
so they can add up to more than the wall time when stages overlap.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True, slots=True)
class PrecomputeSummary:
    """What one precompute run did."""

    store: str
    """The store's path or URL."""
    views_planned: int
    """Views of the selected images (all scales and flips)."""
    views_skipped: int
    """Views already committed by an earlier run, not recomputed."""
    views_stored: int
    """Views committed by this run."""
    views_failed: int
    """Views that could not be produced; each is in the store's failures table with its reason."""
    views_left: int
    """Views neither committed nor failed (only when ``max_views`` cut the run short)."""
    num_parts: int
    """Parts committed by this run."""
    bytes_written: int
    """Bytes of the parts committed by this run (as the store reports them)."""
    seconds: float
    """Wall time of the run, Ray start-up included."""
    ray_init_seconds: float
    """Of which starting or joining the Ray cluster."""
    decode_seconds: float
    """Worker-seconds decoding and rendering."""
    forward_seconds: float
    """Worker-seconds in the teacher's forward pass."""
    encode_seconds: float
    """Worker-seconds moving outputs off the device and casting them."""
    write_seconds: float
    """Worker-seconds in write tasks (codec encoding, compression, commit)."""
    failures: tuple[tuple[int, int, str], ...] = ()
    """``(image_id, view_id, reason)`` of the views that failed in this run."""
    teacher_cpus: tuple[int, ...] = ()
    """Cores the teacher actors were pinned to (empty: no pinning, see `cpu_pinning`)."""
    stage_cpus: tuple[int, ...] = ()
    """Cores decoding and writing were pinned to, beside the teacher's."""
    stage_slots: int = 0
    """Decode and write tasks that could run at once: the task slots the cluster had beside
    the teacher actors, or the cores the stages were pinned to where fewer (0: nothing ran)."""
    num_actors: int = 1
    """Teacher actors of the job."""
    views_quantized_on_device: int = 0
    """Stored views whose int-coded targets the teacher stage quantized (`PrecomputeConfig.quantize_on_device`)."""
    interrupted_by: str | None = None
    """``SIGINT`` or ``SIGTERM`` when a signal stopped the run (its committed parts stay; the
    stage seconds and bytes of an interrupted run are not known and read 0); None otherwise."""

    @property
    def bottleneck(self) -> str:
        """Which side bound the job, from the stage worker-seconds: the teacher, or decode + write.

        The teacher side is the forward and device-to-host seconds per actor; the CPU side is
        the decode and write worker-seconds spread over `stage_slots`. Both are lower bounds
        of the time each side needed; the larger says what to add. Start-up and the tail
        (the first block waiting for its decode, the last part's write) are in neither.
        """
        if not self.views_stored or not self.stage_slots:
            return "-"
        teacher = (self.forward_seconds + self.encode_seconds) / max(1, self.num_actors)
        stages = (self.decode_seconds + self.write_seconds) / self.stage_slots
        if stages > teacher:
            remedy = "more CPUs beside the teacher"
            if self.write_seconds > self.decode_seconds:  # the codecs' encoding, mostly
                remedy += ", or cheaper codecs (--codec-profile fast, or --codec fpn=... per group),"
            return (
                f"decode + write on the CPU: {self.decode_seconds + self.write_seconds:.1f} worker-s over "
                f"{self.stage_slots} task slot(s), >= {stages:.1f} s, against the teacher's {teacher:.1f} s per actor; "
                f"{remedy} would shorten it"
            )
        return (
            f"the teacher: {teacher:.1f} s per actor, against >= {stages:.1f} s of decode + write per task slot "
            f"({self.stage_slots})"
        )

    @property
    def views_per_second(self) -> float:
        """Views committed per second of wall time (0 when nothing ran)."""
        return self.views_stored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failures"] = [list(f) for f in self.failures]
        out["teacher_cpus"], out["stage_cpus"] = list(self.teacher_cpus), list(self.stage_cpus)
        out["views_per_second"] = self.views_per_second
        out["bound_by"] = self.bottleneck
        return out

    def format(self) -> str:
        """The end-of-run table."""
        rows = [
            ("store", self.store),
            ("views planned", f"{self.views_planned}"),
            ("already committed (skipped)", f"{self.views_skipped}"),
            ("stored", f"{self.views_stored} in {self.num_parts} part(s)"),
            ("failed", f"{self.views_failed}"),
        ]
        if self.interrupted_by:
            rows.append(("interrupted by", f"{self.interrupted_by}: the views above stay committed"))
        if self.views_left:
            rows.append(("left for a later run", f"{self.views_left}"))
        rows += [
            ("bytes written", _format_bytes(self.bytes_written)),
            ("wall time", f"{self.seconds:.1f} s (Ray start {self.ray_init_seconds:.1f} s)"),
            ("throughput", f"{self.views_per_second:.2f} views/s"),
            ("decode + render", f"{self.decode_seconds:.1f} worker-s"),
            ("teacher forward", f"{self.forward_seconds:.1f} worker-s"),
            ("encode (to host)", f"{self.encode_seconds:.1f} worker-s"
             + (f", {self.views_quantized_on_device} view(s) quantized there" if self.views_quantized_on_device else "")),
            ("write (codecs + commit)", f"{self.write_seconds:.1f} worker-s"),
            ("CPU pinning", _format_pinning(self.teacher_cpus, self.stage_cpus)),
            ("bound by", self.bottleneck),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {value}" for name, value in rows]
        if self.failures:
            lines.append(f"  first failures (all {self.views_failed} are in the store's failures table):")
            for image_id, view_id, reason in self.failures[:5]:
                lines.append(f"    image_id={image_id} view_id={view_id}: {reason}")
        return "\n".join(lines)


def _format_pinning(teacher: Sequence[int], stages: Sequence[int]) -> str:
    if not teacher:
        return "off"
    return f"teacher on CPU {','.join(map(str, teacher))}; decode and write on CPU {','.join(map(str, stages))}"


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
