"""The store a precompute job fills: fingerprint, target specs and codecs, from the teacher and the config."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from teacher_service.precompute_config import PrecomputeConfig, PrecomputeInputError

logger = logging.getLogger("teacher_service.precompute")  # the job's logger, whichever module logs


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """What the teacher checkpoint and the config decide about the store."""

    fingerprint: dict[str, Any]
    """Teacher fingerprint as stored in the manifest (canvas set to the store's canvas)."""
    target_specs: tuple[Any, ...]
    """`label_store.TargetSpec` of every stored target, in store order."""
    canvas_hw: tuple[int, int]
    """The store's canvas ``(H, W)``."""
    classes: tuple[str, ...]
    """Class names of the stored ``cls`` channels: the dataset's categories, in its order."""
    class_mapping: Any = None
    """`detcore.classes.ClassMapping` from the teacher's classes to ``classes``; None when they are the same."""

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: (C, H_l, W_l)}``."""
        return {spec.name: tuple(int(s) for s in spec.shape) for spec in self.target_specs}


def split_codecs(codecs: Sequence[tuple[str, str]], target_groups: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Codec overrides -> ``(per group, per target name)``, checked against the stored groups."""
    per_group: dict[str, str] = {}
    per_target: dict[str, str] = {}
    for name, codec in codecs:
        group = name.split("/", 1)[0]
        if group not in target_groups:
            raise PrecomputeInputError(
                f"PrecomputeConfig(codecs=) expects a group or target of the stored groups {list(target_groups)}. "
                f"Got {name!r}={codec!r}."
            )
        (per_target if "/" in name else per_group)[name] = codec
    return per_group, per_target


def resolve_codec_profile(config: PrecomputeConfig) -> str:
    """``small`` or ``fast``: ``auto`` is ``fast`` when the teacher runs on a GPU (``--device
    cuda``, or ``auto`` with a GPU visible to this process), else ``small``."""
    if config.codec_profile != "auto":
        return config.codec_profile
    if config.device.startswith("cuda"):
        return "fast"
    if config.device == "cpu":
        return "small"
    import torch

    return "fast" if torch.cuda.is_available() else "small"


def profile_codecs(config: PrecomputeConfig) -> dict[str, str]:
    """Codec per stored group under the resolved codec profile (before ``codecs`` overrides); a group
    stored only in the region takes `BASIS_FREE_CODECS`'s codec where the default is transform-coded."""
    from label_store.codecs import profile_codec
    from label_store.schema import basis_free_defaults

    profile = resolve_codec_profile(config)
    defaults = basis_free_defaults(config.region_groups())
    return {group: profile_codec(defaults[group], profile) for group in config.target_groups}


def store_layout(config: PrecomputeConfig, dataset_classes: Sequence[str] | None = None) -> StoreLayout:
    """Fingerprint and target specs of the store that ``config`` fills (loads the teacher once).

    ``dataset_classes``: the categories the store's ``cls`` targets hold, mapped from the
    teacher's classes by name (`detcore.classes.map_classes` with the config's class map);
    None keeps the teacher's classes.
    """
    from detcore.classes import ClassMappingError, map_classes
    from detcore.teacher import TeacherGroupError, load_teacher
    from label_store.schema import level_step_codecs

    teacher = load_teacher(config.teacher, device="cpu", precision="fp32")
    if dataset_classes is not None:
        try:
            mapping = map_classes(
                teacher.teacher_classes, dataset_classes, class_map=dict(config.class_map), allow_missing=config.allow_missing_classes
            )
        except ClassMappingError as error:
            hint = " (--class-map FILE, --allow-missing-classes)"
            raise PrecomputeInputError(f"{error}{hint} Dataset: {config.annotations}; teacher: {config.teacher}.") from error
        teacher.use_class_mapping(mapping)
    elif config.class_map or config.allow_missing_classes:
        raise PrecomputeInputError("store_layout(config=) with a class map or allow_missing_classes expects dataset_classes.")
    fingerprint = teacher.fingerprint()
    canvas_hw = tuple(int(v) for v in (config.canvas_hw or fingerprint["canvas_hw"]))
    fingerprint["canvas_hw"] = list(canvas_hw)
    per_group, per_target = split_codecs(config.codecs, config.target_groups)
    try:
        # Explicit overrides win over the profile; an explicit profile counts as a choice on resume.
        codecs = {**profile_codecs(config), **per_group}
        chosen_groups = codecs if config.codec_profile != "auto" else per_group
        specs = teacher.target_specs(tuple(config.target_groups), canvas_hw, codecs=codecs)
        # The default transform codec's step grows per coarser level; a group the caller named keeps one codec.
        specs = level_step_codecs(specs, [g for g in config.target_groups if g not in per_group])
        unknown = sorted(set(per_target) - {spec.name for spec in specs})
        if unknown:
            raise PrecomputeInputError(
                f"PrecomputeConfig(codecs=) expects target names of this store {[s.name for s in specs]}. Got {unknown}."
            )
        specs = [dataclasses.replace(s, codec=per_target[s.name]) if s.name in per_target else s for s in specs]
        specs = _keep_existing_codecs(config, specs, chosen_groups, per_target)
    except PrecomputeInputError:
        raise
    except TeacherGroupError as error:  # e.g. --targets box for a teacher without edge distributions
        raise PrecomputeInputError(f"--targets: {error}") from error
    except ValueError as error:  # an unknown codec name: the message carries the grammar
        raise PrecomputeInputError(str(error)) from error
    return StoreLayout(fingerprint, tuple(specs), canvas_hw, tuple(teacher.classes), teacher.class_mapping)


def _keep_existing_codecs(config: PrecomputeConfig, specs: list, per_group: dict, per_target: dict) -> list:
    """Resuming a store: targets whose codec the caller did not choose keep the store's codec.

    Default codecs can change between versions; a store filled under older defaults must
    still resume with the same command. An explicit ``codecs`` choice that differs from the
    store is still refused (by `create_store`, naming each target). A target that keeps a
    transform codec keeps the store's basis too: it is fitted once, when the store is made.
    """
    from label_store.errors import StoreNotFoundError
    from label_store.reader import read_store_targets

    try:
        existing = read_store_targets(config.store, config.storage_options)
    except StoreNotFoundError:
        return specs
    stored = {spec.name: spec for spec in existing}
    out, kept = [], []
    for spec in specs:
        chosen = spec.name in per_target or spec.group in per_group
        old = stored.get(spec.name)
        if not chosen and old is not None and tuple(old.shape) == tuple(spec.shape) and old.codec != spec.codec:
            kept.append(f"{spec.name} {old.codec}")
            spec = dataclasses.replace(spec, codec=old.codec)
        if old is not None and old.transform is not None and tuple(old.shape) == tuple(spec.shape) and old.codec == spec.codec:
            spec = dataclasses.replace(spec, transform=old.transform)
        out.append(spec)
    if kept:
        logger.info("resuming %s with the codecs it was written with (current defaults differ): %s", config.store, ", ".join(kept))
    return out
