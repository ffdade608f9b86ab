"""What a store holds: the teacher fingerprint and the target specs.

Legend: K classes, R reg_max, C channels, H x W one level's map (``ceil(canvas / stride)``).

Target names are ``<group>/<level>``: ``cls/p3`` (K sigmoid logits), ``box/p3``
(4 * (R + 1) edge-distribution logits, channel ``e * (R + 1) + j`` is bin j of edge e in
(left, top, right, bottom)), ``edges/p3`` (4 expected edge distances (left, top, right,
bottom) in stride units), ``fpn/p3`` (C FPN features) and ``backbone/c3`` (backbone
stage features). Every target of a view is float32 array[C, H, W] before encoding and
after decoding. A store has a fixed set of canvases (`StoreCanvas`): ``--canvas HxW`` and,
unless square, its transpose for portrait views; each target has one shape per canvas.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from label_store.codecs import ChannelBasis, TargetCodec, fit_channel_basis, parse_codec

SCHEMA_VERSION = 2
"""Version of the on-disk layout of a store without a `StoreRegion`; readers refuse versions they do not know.

1: one canvas per store. 2: a list of canvases (`StoreCanvas`), a ``canvas`` column in the
manifest, and the arrays of every canvas but the first under its own group in each part.
3: schema 2 plus region storage (`StoreRegion`), region values in the ``channels`` order;
the region records its groups, and a reader refuses a region group it does not know (``cls``
came after ``box``).
4 (`REGION_SCHEMA_VERSION`): schema 3 with region values in the ``points`` order
(`label_store.codecs.REGION_LAYOUTS`: 5% fewer box bytes)."""
FIRST_REGION_SCHEMA_VERSION = 3
"""The first version with region storage."""
REGION_SCHEMA_VERSION = 4
"""Version written for a new store with a `StoreRegion`: a reader that does not know its region
layout must refuse it (it would read the packed region layout as dense maps, or in the other
order); stores without one stay at `SCHEMA_VERSION`, so older readers still open them. A schema 3
store keeps its version, and its layout, when it is resumed."""
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
"""Versions this package reads (schema 1 stores read as stores of one canvas)."""


def region_layout(schema_version: int) -> str:
    """The order of a region store's values (`label_store.codecs.REGION_LAYOUTS`) in schema ``schema_version``."""
    return "channels" if schema_version == FIRST_REGION_SCHEMA_VERSION else "points"

TARGET_GROUPS = ("cls", "box", "edges", "fpn", "backbone")
"""Known target groups in store order, the one definition (`detcore.outputs` re-exports it);
each has a reference loss in `label_store.fidelity`."""

BACKBONE_STRIDES = {"c3": 8, "c4": 16, "c5": 32}
"""Stride of each backbone stage (matches detcore.outputs, which label_store must not import)."""

LOSS_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "ld_main": ("cls", "box"),
    "ld_vlr": ("cls", "box"),
    "ld_kd": ("cls", "box"),
    "ld_im": ("fpn",),
    "bcd": ("cls", "box"),
    "fgd": ("fpn",),
    "hgd": ("fpn", "backbone"),
}
"""Distillation term -> the target groups it reads, the one table (the trainer asks a source for
these; precompute and the endpoint store them by default). Keys are every term a run can enable,
in the order runs list them. `loss_target_groups` applies the two refinements."""

LOSS_TARGET_SUBSTITUTES: dict[str, dict[str, str]] = {"bcd": {"box": "edges"}}
"""Per term, a group it reads in place of another when a store holds only the substitute: BCD
needs only the teacher's decoded boxes, so expected edge distances replace edge distributions."""


def loss_target_groups(
    terms: Sequence[str],
    *,
    available: Sequence[str] | None = None,
    region_groups: Sequence[str] = (),
    hgd_stages: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Target groups that ``terms`` read (`LOSS_TARGET_GROUPS`), in `TARGET_GROUPS` order.

    Args:
        terms: distillation terms (keys of `LOSS_TARGET_GROUPS`).
        available: groups a store holds; a term reads a substitute group
            (`LOSS_TARGET_SUBSTITUTES`) when the store has it at every point but not the group
            it replaces.
        region_groups: groups the store holds only in its region (`StoreRegion.groups`): for a
            substitute they count as not held.
        hgd_stages: the stages HGD distills; it then reads ``backbone`` for c3..c5 and ``fpn``
            for p3..p7 only as they occur (None: both).
    """
    groups: set[str] = set()
    for term in terms:
        if term not in LOSS_TARGET_GROUPS:
            raise ValueError(f"loss_target_groups(terms=) expects names from {list(LOSS_TARGET_GROUPS)}. Got {term!r}.")
        read = LOSS_TARGET_GROUPS[term]
        if term == "hgd" and hgd_stages is not None:
            read = tuple("backbone" if stage in BACKBONE_STRIDES else "fpn" for stage in hgd_stages)
        if available is not None:
            dense = set(available) - set(region_groups)
            for group, substitute in LOSS_TARGET_SUBSTITUTES.get(term, {}).items():
                if group not in dense and substitute in dense:
                    read = tuple(substitute if g == group else g for g in read)
        groups.update(read)
    return tuple(g for g in TARGET_GROUPS if g in groups)


DEFAULT_STORED_TERMS = ("ld_main", "ld_vlr", "ld_kd", "ld_im", "bcd", "fgd")
"""Terms whose targets precompute and the endpoint produce unless told otherwise: every term but
HGD, whose backbone stages are the largest group and are asked for by ``--targets``."""

DEFAULT_STORED_GROUPS = loss_target_groups(DEFAULT_STORED_TERMS)
"""The groups `DEFAULT_STORED_TERMS` read: ``cls``, ``box``, ``fpn``."""

# Chosen by benchmarks/store_codecs.py on a trained teacher's real outputs (gfl_r18, 64
# channels, 13.6 AP on the synthetic benchmark, 32 val views at canvas 128; see
# benchmarks/RESULTS.md, "Label store"): per group the smallest encoding whose
# reference-loss error stays under 0.5% (cls, box) or 1% (fpn, backbone) on every level.
# Logits and FPN maps are smooth across neighbouring points (and box bins), so their codes
# are differenced before zstd (``-dchw``, ``-dbhw`` within each box edge's bins, ``-dhw``;
# lossless); zstd level 15 buys another 10-15% on these small per-view chunks at ~50 MB/s
# encode per core (levels 9-12 are faster but up to 8% larger on box). Sparse post-ReLU
# backbone maps compress best with bit shuffle instead. Re-run the benchmark on your own
# teacher (or call label_store.choose_codecs) before filling a large store;
# `distill precompute --codec GROUP=CODEC` overrides one.
DEFAULT_CODECS = {
    # Transform-coded, one k on every level (benchmarks/RESULTS.md, "Store size and write cost
    # per codec profile", class logits): fewer bytes than int5 with every method's cls error
    # lower; cls held in a region, and the endpoint, use `BASIS_FREE_CODECS`'s int codec.
    "cls": "pca-std24-dct+blosc-zstd9-bitshuffle",
    "box": "int6-view-dbhw+zstd15",
    # Edge distances (stride units, smooth across neighbouring points): 8 bits per channel.
    "edges": "int8-channel-dhw+zstd15",
    # Transform-coded (benchmarks/RESULTS.md, "FPN transform coding"): a basis per level,
    # fitted by the precompute job on a new store's first views and kept in its schema; the
    # finest level's step, the coarser levels' follow `DEFAULT_LEVEL_STEP_GROWTH`.
    "fpn": "pca-std3+blosc-zstd5-bitshuffle",
    "backbone": "int6-view+blosc-zstd5-bitshuffle",
}

DEFAULT_LEVEL_STEP_GROWTH = {"fpn": 2}
"""Per group, the factor by which the k of its default ``pca-std<k>`` codec grows on each
coarser level (`level_step_codecs`): FGD, ``ld_im`` and HGD average each level over its points
and add the levels, so one point of a level with a quarter of the points weighs 4x, and a
step in proportion to the square root of a level's points (k doubling per level) spends the
bytes where the losses look. Measured on a trained teacher: 15.7x at FGD error 0.37% against
13.3x at 0.42% for one step on every level (benchmarks/RESULTS.md, "FPN transform coding")."""


def level_step_codecs(specs: Sequence["TargetSpec"], groups: Sequence[str]) -> list["TargetSpec"]:
    """``specs`` with the ``pca-std<k>`` codecs of ``groups`` (those in `DEFAULT_LEVEL_STEP_GROWTH`)
    at ``k * growth**i`` on their i-th level (0: the finest, in spec order)."""
    out, seen = [], {}
    for spec in specs:
        growth = DEFAULT_LEVEL_STEP_GROWTH.get(spec.group) if spec.group in groups else None
        codec = spec.target_codec
        if growth is None or codec.storage != "pca":
            out.append(spec)
            continue
        level = seen[spec.group] = seen.get(spec.group, -1) + 1
        out.append(replace(spec, codec=replace(codec, steps_per_std=codec.steps_per_std * growth**level).name))
    return out


BASIS_FREE_CODECS = {
    "cls": "int5-view-dchw+zstd15",
    "fpn": "int6-view-dhw+zstd15",
}
"""The codec of a group whose `DEFAULT_CODECS` entry needs a store's channel basis, where
there is none to fit it on: the specs of `default_target_specs` (they come without data)
and so the endpoint's wire, which has no store; and where the store keeps the group only in
its region (`StoreRegion`), which transform codecs cannot serve. Also the default of stores
written before transform coding."""



def basis_free_defaults(groups: Sequence[str]) -> dict[str, str]:
    """`DEFAULT_CODECS` with `BASIS_FREE_CODECS`'s codec for each of ``groups`` that has one
    (where no basis is fitted, or the group is stored only in a region)."""
    return {group: BASIS_FREE_CODECS.get(group, name) if group in groups else name for group, name in DEFAULT_CODECS.items()}


REGION_GROUPS = ("cls", "box", "edges")
"""Groups a store may hold only inside its `StoreRegion`, in store order."""
REGION_DIOU_MODES = ("standard", "released")
"""DIoU flavours of LD's valuable localization region (`detcore.assign.vlr_region`)."""
REGION_ARRAY = "region"
"""Array of a part holding each view's stored-point mask (`StoreRegion`), beside ``quant``."""

_NAME_RE = re.compile(r"^(cls|box|edges|fpn|backbone)/([a-z][a-z0-9_]{0,15})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@runtime_checkable
class ViewRecipe(Protocol):
    """A typed view recipe, as `label_store.writer.PartWriter.append` takes a record's ``view``.

    `detcore.views.View` is one (label_store does not import it): the writer reads the
    canvas from it and serialises ``to_dict()`` once, with sorted keys, as the manifest's
    ``view`` JSON, the format plain pyarrow readers see.
    """

    @property
    def canvas_h(self) -> int:
        """Canvas height in pixels: picks the store canvas the view's targets go to."""

    @property
    def canvas_w(self) -> int:
        """Canvas width in pixels."""

    def to_dict(self) -> dict[str, Any]:
        """The recipe's fields as JSON-ready values."""


def level_name(stride: int) -> str:
    """FPN level name of a stride: 8 -> ``p3``, 128 -> ``p7``."""
    if not isinstance(stride, int) or stride <= 0 or stride & (stride - 1):
        raise ValueError(f"level_name(stride=) expects a positive power of two. Got {stride!r}.")
    return f"p{stride.bit_length() - 1}"


def _canonical_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} expects JSON types (dict, list, str, number, bool, None). Got {value!r}: {error}.") from None


@dataclass(frozen=True, slots=True)
class TeacherFingerprint:
    """Everything about the teacher that changes its outputs; a store holds exactly one."""

    architecture: str
    """Model name and configuration, e.g. ``"gfl_r50_fpn"``."""
    checkpoint_sha256: str
    """SHA-256 (64 lowercase hex digits) of the checkpoint file or state dict."""
    classes: tuple[str, ...]
    """Class names in logit-channel order (K of them)."""
    canvas_hw: tuple[int, int]
    """``(height, width)`` of the fixed canvas every view is rendered onto."""
    strides: tuple[int, ...]
    """FPN strides, e.g. ``(8, 16, 32, 64, 128)``."""
    reg_max: int
    """R: each box edge distribution has R + 1 bins."""
    preprocessing: dict = field(default_factory=dict, hash=False)
    """Pixel normalisation and rendering details (JSON types), e.g. mean, std, resampling."""
    class_mapping: dict | None = field(default=None, hash=False)
    """How the teacher's class channels became ``classes`` (`detcore.classes.ClassMapping.to_dict`:
    teacher_classes, dataset_classes, teacher_index with -1 for a category the teacher lacks,
    dropped_teacher_classes, missing_dataset_classes, class_map); None when the teacher's
    classes are the dataset's, in order."""

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError(f"TeacherFingerprint(architecture=) expects a non-empty string. Got {self.architecture!r}.")
        if not isinstance(self.checkpoint_sha256, str) or not _SHA256_RE.match(self.checkpoint_sha256):
            raise ValueError(
                f"TeacherFingerprint(checkpoint_sha256=) expects 64 lowercase hex digits. Got {self.checkpoint_sha256!r}."
            )
        classes = tuple(self.classes) if not isinstance(self.classes, str) else None
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(f"TeacherFingerprint(classes=) expects a non-empty sequence of names. Got {self.classes!r}.")
        object.__setattr__(self, "classes", classes)
        canvas = tuple(self.canvas_hw)
        if len(canvas) != 2 or not all(isinstance(v, int) and v > 0 for v in canvas):
            raise ValueError(f"TeacherFingerprint(canvas_hw=) expects two positive ints. Got {self.canvas_hw!r}.")
        object.__setattr__(self, "canvas_hw", canvas)
        strides = tuple(self.strides)
        if not strides or not all(isinstance(s, int) and s > 0 and not s & (s - 1) for s in strides):
            raise ValueError(f"TeacherFingerprint(strides=) expects positive powers of two. Got {self.strides!r}.")
        if list(strides) != sorted(set(strides)):
            raise ValueError(f"TeacherFingerprint(strides=) expects strictly increasing strides. Got {self.strides!r}.")
        object.__setattr__(self, "strides", strides)
        if not isinstance(self.reg_max, int) or isinstance(self.reg_max, bool) or self.reg_max <= 0:
            raise ValueError(f"TeacherFingerprint(reg_max=) expects a positive int. Got {self.reg_max!r}.")
        if not isinstance(self.preprocessing, dict):
            raise ValueError(f"TeacherFingerprint(preprocessing=) expects a dict. Got {type(self.preprocessing).__name__}.")
        object.__setattr__(self, "preprocessing", _canonical_json(self.preprocessing, "TeacherFingerprint(preprocessing=)"))
        if self.class_mapping is not None:
            mapping = self.class_mapping
            if not isinstance(mapping, dict) or tuple(mapping.get("dataset_classes", ())) != classes:
                raise ValueError(
                    "TeacherFingerprint(class_mapping=) expects a dict whose dataset_classes are the fingerprint's classes "
                    f"{list(classes)}. Got {mapping!r}."
                )
            index = mapping.get("teacher_index")
            if not isinstance(index, list) or len(index) != len(classes):
                raise ValueError(f"TeacherFingerprint(class_mapping=) expects a teacher_index per class. Got {index!r}.")
            object.__setattr__(self, "class_mapping", _canonical_json(mapping, "TeacherFingerprint(class_mapping=)"))

    @property
    def class_mask(self) -> tuple[bool, ...]:
        """Per class: False for a category the teacher lacks (its ``cls`` channel is filler, not a target)."""
        if self.class_mapping is None:
            return (True,) * len(self.classes)
        return tuple(int(i) >= 0 for i in self.class_mapping["teacher_index"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {
            "architecture": self.architecture,
            "checkpoint_sha256": self.checkpoint_sha256,
            "classes": list(self.classes),
            "canvas_hw": list(self.canvas_hw),
            "strides": list(self.strides),
            "reg_max": self.reg_max,
            "preprocessing": self.preprocessing,
        } | ({} if self.class_mapping is None else {"class_mapping": self.class_mapping})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TeacherFingerprint":
        expected = {"architecture", "checkpoint_sha256", "classes", "canvas_hw", "strides", "reg_max", "preprocessing"}
        if not isinstance(data, Mapping) or not expected <= set(data) <= expected | {"class_mapping"}:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"TeacherFingerprint.from_dict(data=) expects exactly the keys {sorted(expected)} (and optionally class_mapping). Got {got}."
            )
        return cls(
            architecture=data["architecture"],
            checkpoint_sha256=data["checkpoint_sha256"],
            classes=tuple(data["classes"]),
            canvas_hw=tuple(data["canvas_hw"]),
            strides=tuple(data["strides"]),
            reg_max=data["reg_max"],
            preprocessing=dict(data["preprocessing"]),
            class_mapping=None if data.get("class_mapping") is None else dict(data["class_mapping"]),
        )

    def diff(self, other: "TeacherFingerprint") -> list[str]:
        """Human-readable differences, ``self`` read as the store and ``other`` as the caller.

        Example: ``["canvas_hw: store has (256, 256), caller expects (320, 320)"]``.
        """
        out = []
        for name in ("architecture", "checkpoint_sha256", "canvas_hw", "strides", "reg_max", "preprocessing", "class_mapping"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: store has {mine!r}, caller expects {theirs!r}")
        if self.classes != other.classes:
            out.append(f"classes: store has {_describe_classes(self.classes, other.classes)}, caller expects {_describe_classes(other.classes, self.classes)}")
        return out


def _describe_classes(mine: tuple[str, ...], theirs: tuple[str, ...]) -> str:
    if len(mine) <= 8:
        text = repr(mine)
    else:
        text = f"{len(mine)} classes"
    for index, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return f"{text} (class {index} is {a!r})"
    return f"{text} ({len(mine)} names)"


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One stored target: its name, the shape of one view, and its codec."""

    name: str
    """``<group>/<level>`` with group in cls, box, fpn, backbone, e.g. ``"box/p4"``."""
    shape: tuple[int, int, int]
    """``(C, H, W)`` of one view (float32 logits or features before encoding)."""
    codec: str
    """Codec name (see `label_store.codecs`), e.g. ``"int8-channel+zstd5"``."""
    transform: ChannelBasis | None = None
    """The store's channel basis of a transform codec (``pca-std<k>``, fitted by
    `fit_target_bases`); None for every other codec, and absent from `to_dict` then, so
    stores written before transform codecs read unchanged."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"TargetSpec(name=) expects '<group>/<level>' with group in {TARGET_GROUPS} and a lowercase level "
                f"such as 'p3' or 'c4'. Got {self.name!r}."
            )
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        if shape is None or len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
            raise ValueError(f"TargetSpec(shape=) expects (C, H, W), three positive ints. Got {self.shape!r} for {self.name!r}.")
        object.__setattr__(self, "shape", shape)
        try:
            codec = parse_codec(self.codec)
        except ValueError as error:
            raise ValueError(f"TargetSpec(codec=) expects a valid codec name for {self.name!r}. Got {self.codec!r}: {error}") from None
        object.__setattr__(self, "codec", codec.name)
        if self.transform is not None:
            if not codec.needs_basis:
                raise ValueError(f"TargetSpec(transform=) expects None for codec {codec.name!r} of {self.name!r}: only pca codecs use a basis.")
            if not isinstance(self.transform, ChannelBasis) or self.transform.channels != shape[0]:
                raise ValueError(
                    f"TargetSpec(transform=) expects a ChannelBasis of {shape[0]} channels for {self.name!r}. Got {self.transform!r:.80}."
                )
        if self.group == "box" and (shape[0] % 4 or shape[0] // 4 < 2):
            raise ValueError(
                f"TargetSpec(shape=) expects 4 * (R + 1) channels for box target {self.name!r}. Got C={shape[0]}."
            )

    @property
    def group(self) -> str:
        """``"cls"``, ``"box"``, ``"fpn"`` or ``"backbone"``."""
        return self.name.split("/", 1)[0]

    @property
    def level(self) -> str:
        """``"p3"``, ``"c4"``, ..."""
        return self.name.split("/", 1)[1]

    @property
    def target_codec(self) -> TargetCodec:
        """The codec, bound to `transform` where it has one."""
        codec = parse_codec(self.codec)
        return codec.with_basis(self.transform) if self.transform is not None else codec

    @property
    def num_elements(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def fp32_nbytes(self) -> int:
        """Bytes of one view of this target as float32 (the reference size)."""
        return 4 * self.num_elements

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "shape": list(self.shape), "codec": self.codec}
        return out if self.transform is None else out | {"transform": self.transform.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TargetSpec":
        keys = {"name", "shape", "codec"}
        if not isinstance(data, Mapping) or not keys <= set(data) <= keys | {"transform"}:
            raise ValueError(f"TargetSpec.from_dict(data=) expects keys ['codec', 'name', 'shape'] (and optionally 'transform'). Got {data!r:.200}.")
        transform = data.get("transform")
        return cls(
            name=data["name"], shape=tuple(data["shape"]), codec=data["codec"],
            transform=None if transform is None else ChannelBasis.from_dict(dict(transform)),
        )


def fit_target_bases(targets: Sequence[TargetSpec], sample: Sequence[Mapping[str, Any]]) -> list[TargetSpec]:
    """The targets with a channel basis fitted for each one whose codec needs it (``pca-std<k>``).

    Args:
        targets: the store's targets; those of other codecs, or already holding a
            `TargetSpec.transform`, come back unchanged.
        sample: the first views' targets, name -> float array[C, H, W] (a handful of
            views is enough: the basis is the channels' principal axes, `fit_channel_basis`).
    """
    out = []
    for spec in targets:
        if spec.transform is not None or not spec.target_codec.needs_basis:
            out.append(spec)
            continue
        arrays = [view[spec.name] for view in sample if spec.name in view]
        if not arrays:
            raise ValueError(f"fit_target_bases(sample=) expects views holding {spec.name} to fit its {spec.codec} basis. Got none.")
        out.append(TargetSpec(spec.name, spec.shape, spec.codec, fit_channel_basis(arrays)))
    return out


def default_target_specs(
    num_classes: int,
    reg_max: int,
    canvas_hw: tuple[int, int],
    strides: Sequence[int],
    fpn_channels: int,
    backbone_channels: Sequence[int] | Mapping[str, int] | None = None,
    groups: Sequence[str] = DEFAULT_STORED_GROUPS,
    codecs: Mapping[str, str] | None = None,
) -> list[TargetSpec]:
    """The targets of a GFL-style teacher, one per group and level, with measured default codecs.

    Args:
        num_classes: K.
        reg_max: R.
        canvas_hw: ``(H, W)`` of the store's canvas; each level is ``ceil(H / s), ceil(W / s)``.
        strides: FPN strides, e.g. ``(8, 16, 32, 64, 128)``.
        fpn_channels: C of every FPN level.
        backbone_channels: channels of stages ``(c3, c4, c5)`` (a sequence or a mapping from
            stage name); required when ``"backbone"`` is in ``groups``.
        groups: which target groups to store, any of `TARGET_GROUPS`.
        codecs: codec per group overriding `DEFAULT_CODECS`. A group left to its default
            gets `BASIS_FREE_CODECS`'s codec where the default needs a fitted basis, so the
            specs encode as they are; to store the default transform codec, name it here,
            apply `level_step_codecs` and fit the bases on the first views
            (`fit_target_bases`), as the precompute job does.
    Returns:
        Specs in group order, then level order.
    """
    unknown = [g for g in groups if g not in TARGET_GROUPS]
    if unknown or not groups or len(set(groups)) != len(groups):
        raise ValueError(f"default_target_specs(groups=) expects distinct names from {TARGET_GROUPS}. Got {tuple(groups)!r}.")
    chosen = basis_free_defaults(TARGET_GROUPS)
    for group, name in (codecs or {}).items():
        if group not in TARGET_GROUPS:
            raise ValueError(f"default_target_specs(codecs=) expects keys from {TARGET_GROUPS}. Got {group!r}.")
        chosen[group] = parse_codec(name).name
    for name, value in (("num_classes", num_classes), ("reg_max", reg_max), ("fpn_channels", fpn_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"default_target_specs({name}=) expects a positive int. Got {value!r}.")
    canvas = tuple(canvas_hw)
    if len(canvas) != 2 or not all(isinstance(v, int) and v > 0 for v in canvas):
        raise ValueError(f"default_target_specs(canvas_hw=) expects two positive ints. Got {canvas_hw!r}.")

    def hw(stride: int) -> tuple[int, int]:
        return (math.ceil(canvas[0] / stride), math.ceil(canvas[1] / stride))

    levels = [(level_name(s), hw(s)) for s in strides]
    channels = {"cls": num_classes, "box": 4 * (reg_max + 1), "edges": 4, "fpn": fpn_channels}
    specs: list[TargetSpec] = []
    for group in groups:
        if group == "backbone":
            if backbone_channels is None:
                raise ValueError("default_target_specs(backbone_channels=) expects the (c3, c4, c5) channels when groups include 'backbone'. Got None.")
            if isinstance(backbone_channels, Mapping):
                stages = dict(backbone_channels)
            else:
                values = tuple(backbone_channels)
                if len(values) != len(BACKBONE_STRIDES):
                    raise ValueError(f"default_target_specs(backbone_channels=) expects 3 values (c3, c4, c5). Got {values!r}.")
                stages = dict(zip(BACKBONE_STRIDES, values))
            for stage, num in stages.items():
                if stage not in BACKBONE_STRIDES:
                    raise ValueError(f"default_target_specs(backbone_channels=) expects stages {tuple(BACKBONE_STRIDES)}. Got {stage!r}.")
                specs.append(TargetSpec(f"backbone/{stage}", (num, *hw(BACKBONE_STRIDES[stage])), chosen["backbone"]))
            continue
        for level, (h, w) in levels:
            specs.append(TargetSpec(f"{group}/{level}", (channels[group], h, w), chosen[group]))
    return specs


def target_stride(spec: TargetSpec) -> int:
    """Stride of a target's level: ``p3`` -> 8, ``c4`` -> 16."""
    if spec.group == "backbone":
        return BACKBONE_STRIDES[spec.level]
    return 1 << int(spec.level[1:])


def default_canvases(canvas_hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The canvases of a store made for ``canvas_hw``: it, then its transpose unless square."""
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    return ((h, w),) if h == w else ((h, w), (w, h))


def canvas_targets(targets: Sequence[TargetSpec], canvas_hw: Sequence[int]) -> tuple[TargetSpec, ...]:
    """The same targets (names, channels, codecs) with the level shapes of ``canvas_hw``."""
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    out = []
    for spec in targets:
        stride = target_stride(spec)
        out.append(TargetSpec(spec.name, (spec.shape[0], math.ceil(h / stride), math.ceil(w / stride)), spec.codec, spec.transform))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class StoreRegion:
    """Region storage: the groups a store holds only at the points its losses read.

    LD reads the teacher's edge distributions only at the ATSS positives and in its valuable
    localization region (VLR), its class logits only at the positives (``ld_kd``), and both
    regions follow from the view's GT boxes alone. A store with a
    region keeps, per view, a mask over the A points of all levels (level-major, row-major,
    as `detcore.outputs.level_anchors`), `detcore.assign.stored_region`: the ATSS candidates
    of ``topk`` (the positives are among them) and every point whose DIoU with a GT reaches
    ``vlr_alpha`` times that GT's ATSS threshold (the VLR at ``vlr_alpha`` without its upper
    bound; a larger alpha reads a subset), on the anchors of ``point_offset``. Both supersets
    keep a point whose IoU lands on a threshold's other side on another device stored.
    The region groups' chunks keep their shape in the region layout of
    `label_store.codecs.TargetCodec.stored_codes` (the kept points' codes first, zeros after,
    which entropy coding removes); quantization scale and offset are those of the whole map,
    so a stored point decodes to exactly what a dense store of the same codec holds. Readers
    decode the points outside the mask as NaN, which no stored target can be.
    """

    groups: tuple[str, ...]
    """Groups held only inside the mask, from `REGION_GROUPS` (``("box",)``: LD's distributions;
    ``("cls", "box")``: its class logits too, which BCD then cannot read)."""
    topk: int
    """ATSS candidates per level per GT of the positives and of the VLR threshold."""
    vlr_alpha: float
    """Lower bound of the VLR as a fraction of the ATSS threshold (LD's ``alpha``), in (0, 1]."""
    vlr_diou: str = "standard"
    """DIoU flavour of the VLR, one of `REGION_DIOU_MODES`."""
    point_offset: float = 0.5
    """Where cell (x, y) of stride s sits, ``((x + o) s, (y + o) s)``: the *student's* point
    convention, which its ATSS and VLR use (0.5 for this project's detectors)."""

    def __post_init__(self) -> None:
        groups = tuple(self.groups) if not isinstance(self.groups, str) else ()
        if not groups or len(set(groups)) != len(groups) or any(g not in REGION_GROUPS for g in groups):
            raise ValueError(f"StoreRegion(groups=) expects distinct names from {REGION_GROUPS}. Got {self.groups!r}.")
        object.__setattr__(self, "groups", tuple(g for g in REGION_GROUPS if g in groups))
        if not isinstance(self.topk, int) or isinstance(self.topk, bool) or self.topk < 1:
            raise ValueError(f"StoreRegion(topk=) expects a positive int. Got {self.topk!r}.")
        if isinstance(self.vlr_alpha, bool) or not isinstance(self.vlr_alpha, (int, float)) or not 0 < self.vlr_alpha <= 1:
            raise ValueError(f"StoreRegion(vlr_alpha=) expects a number in (0, 1]. Got {self.vlr_alpha!r}.")
        object.__setattr__(self, "vlr_alpha", float(self.vlr_alpha))
        if self.vlr_diou not in REGION_DIOU_MODES:
            raise ValueError(f"StoreRegion(vlr_diou=) expects one of {REGION_DIOU_MODES}. Got {self.vlr_diou!r}.")
        if isinstance(self.point_offset, bool) or not isinstance(self.point_offset, (int, float)) or not 0 <= self.point_offset < 1:
            raise ValueError(f"StoreRegion(point_offset=) expects a number in [0, 1). Got {self.point_offset!r}.")
        object.__setattr__(self, "point_offset", float(self.point_offset))

    def describe(self) -> str:
        """``box at ATSS positives (topk 9) and VLR (alpha >= 0.25, standard DIoU), point offset 0.5``."""
        return (
            f"{'/'.join(self.groups)} at ATSS positives (topk {self.topk}) and VLR (alpha >= {self.vlr_alpha:g}, "
            f"{self.vlr_diou} DIoU), point offset {self.point_offset:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": list(self.groups),
            "topk": self.topk,
            "vlr_alpha": self.vlr_alpha,
            "vlr_diou": self.vlr_diou,
            "point_offset": self.point_offset,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StoreRegion":
        expected = {"groups", "topk", "vlr_alpha", "vlr_diou", "point_offset"}
        if not isinstance(data, Mapping) or set(data) != expected:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"StoreRegion.from_dict(data=) expects exactly the keys {sorted(expected)}. Got {got}.")
        return cls(tuple(data["groups"]), data["topk"], data["vlr_alpha"], data["vlr_diou"], data["point_offset"])


def region_num_points(canvas: "StoreCanvas", strides: Sequence[int]) -> int:
    """A: points over the FPN levels of ``strides`` on one canvas (the length of a view's region mask)."""
    return sum(math.ceil(canvas.canvas_hw[0] / s) * math.ceil(canvas.canvas_hw[1] / s) for s in strides)


@dataclass(frozen=True, slots=True)
class StoreCanvas:
    """One canvas of a store and where its arrays live inside each part."""

    canvas_hw: tuple[int, int]
    """``(height, width)`` of every view on this canvas."""
    path: str
    """Group of its arrays inside a part directory: ``""`` (the part's root) for the first
    canvas, ``"canvas_<H>x<W>"`` for the others."""
    targets: tuple[TargetSpec, ...]
    """The store's targets with this canvas's shapes (one fixed chunk shape per array)."""

    def array_path(self, name: str) -> str:
        """Path of target (or ``quant``) array ``name`` inside a part directory."""
        return f"{self.path}/{name}" if self.path else name

    def to_dict(self) -> dict[str, Any]:
        return {"canvas_hw": list(self.canvas_hw), "path": self.path, "targets": [t.to_dict() for t in self.targets]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StoreCanvas":
        if not isinstance(data, Mapping) or set(data) != {"canvas_hw", "path", "targets"}:
            raise ValueError(f"StoreCanvas.from_dict(data=) expects keys ['canvas_hw', 'path', 'targets']. Got {data!r}.")
        canvas = tuple(int(v) for v in data["canvas_hw"])
        if len(canvas) != 2 or min(canvas) <= 0:
            raise ValueError(f"StoreCanvas(canvas_hw=) expects two positive ints. Got {data['canvas_hw']!r}.")
        return cls(canvas, str(data["path"]), tuple(TargetSpec.from_dict(t) for t in data["targets"]))


def store_canvases(targets: Sequence[TargetSpec], canvases: Sequence[Sequence[int]]) -> tuple[StoreCanvas, ...]:
    """`StoreCanvas` of each canvas, the first at the part root (the schema 1 layout)."""
    out = []
    for index, canvas in enumerate(canvases):
        h, w = int(canvas[0]), int(canvas[1])
        out.append(StoreCanvas((h, w), "" if index == 0 else f"canvas_{h}x{w}", canvas_targets(targets, (h, w))))
    return tuple(out)


def padding_fraction(spec: TargetSpec, canvas_hw: Sequence[int], valid_regions: Any) -> Any:
    """Share of a target's cells that lie in the padding, per view.

    Args:
        spec: the target (its stride and its shape on this canvas).
        canvas_hw: the canvas the views are on.
        valid_regions: array[N, 4] of ``(x1, y1, x2, y2)`` canvas pixels covered by the image.
    Returns:
        float64 array[N]: cells whose receptive cell lies wholly outside the valid region,
        over all cells of the level (``ceil(canvas / stride)`` per side).
    """
    import numpy as np

    stride = target_stride(spec)
    regions = np.asarray(valid_regions, dtype=np.int64).reshape(-1, 4)
    height, width = math.ceil(int(canvas_hw[0]) / stride), math.ceil(int(canvas_hw[1]) / stride)
    cols = -(-regions[:, 2] // stride) - regions[:, 0] // stride
    rows = -(-regions[:, 3] // stride) - regions[:, 1] // stride
    return 1.0 - (np.minimum(cols, width) * np.minimum(rows, height)) / float(height * width)
