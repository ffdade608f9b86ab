"""The run configuration of `distill train`: one frozen dataclass tree, built in one place.

A run is described by `TrainRunConfig`. It is built by `build_run_config` only, from (in
increasing priority) the defaults below, an optional JSON or YAML file, and overrides (the
CLI's flags and ``--set section.field=value`` pairs). The resolved configuration is written
to ``<out>/run_config.json`` and into every checkpoint, so a run can be reproduced and
resumed from its own record.

Loss weights live here, in the recipe dataclasses `LDConfig`, `BCDConfig`, `FGDConfig` and
`HGDConfig` (defaults: the papers' released configs), never inside the losses; the recipes of
`student_trainer.losses.recipes` take them as arguments. Which teacher target groups each term
reads is the table `LOSS_TARGET_GROUPS`. This module imports no torch: a config is built,
checked and written without loading the training stack.

Example file (every key optional except the data paths)::

    {"data": {"store": "stores/t.zarr", "annotations": "train.json", "images": "train/"},
     "student": {"arch": "gfl_tiny"},
     "optim": {"epochs": 12, "batch_size": 16, "lr": 0.002},
     "losses": {"enabled": ["ld_main", "ld_vlr", "ld_kd", "fgd"], "fgd": {"alpha": 0.002}},
     "out": "runs/ld_fgd"}
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping

from detcore.optim import OPTIMIZER_DEFAULTS, OPTIMIZERS
from label_store.schema import LOSS_TARGET_GROUPS, loss_target_groups

LOSS_TERMS = tuple(LOSS_TARGET_GROUPS)
"""Every distillation term a run can enable, by name. ``ld_im`` is the feature imitation that
LD's released training configs add to LD (FPN features, fine-grained region, weight 2); the
paper's LD is main + VLR + KD."""

LOSS_GROUPS = {
    "ld": ("ld_main", "ld_vlr", "ld_kd"),
    "none": (),
    "all": ("ld_main", "ld_vlr", "ld_kd", "bcd", "fgd", "hgd"),
}
"""Names accepted by ``--losses`` that stand for several terms: ``ld`` is the paper's LD
(main + VLR + KD); ``all`` is the four methods' recipes (LD, BCD, FGD, HGD), without ``ld_im``."""

SOURCE_KINDS = ("store", "remote", "read-through", "inprocess")
"""Where the teacher's targets come from; ``store`` (offline) is the default, ``inprocess`` a baseline only."""


class ConfigError(ValueError):
    """A run configuration that cannot be used (it names the key and says what is expected)."""


def parse_losses(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"ld,fgd"`` -> ``("ld_main", "ld_vlr", "ld_kd", "fgd")``; order follows `LOSS_TERMS`.

    Accepts term names (`LOSS_TERMS`), group names (`LOSS_GROUPS`) and ``+`` or ``,`` as
    separators; an empty string or ``none`` enables no distillation (the student baseline).
    """
    if isinstance(text, str):
        parts = [p.strip().lower() for p in text.replace("+", ",").split(",")]
    else:
        parts = [str(p).strip().lower() for p in text]
    chosen: set[str] = set()
    for part in parts:
        if not part:
            continue
        if part in LOSS_GROUPS:
            chosen.update(LOSS_GROUPS[part])
        elif part in LOSS_TERMS:
            chosen.add(part)
        else:
            raise ConfigError(
                f"losses= expects a comma-separated list of {list(LOSS_TERMS)} or {sorted(LOSS_GROUPS)}. Got {part!r} in {text!r}."
            )
    return tuple(t for t in LOSS_TERMS if t in chosen)


FGD_DEFAULTS: dict[str, dict[str, float]] = {
    "retinanet": dict(temperature=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4, lambda_=5e-6),
    "gfl": dict(temperature=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4, lambda_=5e-6),
    "fcos": dict(temperature=0.8, alpha=1.6e-3, beta=8e-4, gamma=8e-4, lambda_=8e-6),
}
"""Loss hyper-parameters of the released FGD configs, by detector family."""

DEFAULT_HGD_STAGES = ("c3", "c4", "c5", "p3", "p4", "p5", "p6", "p7")
"""Stages HGD distills by default: backbone c3..c5 and FPN p3..p7."""


@dataclass(frozen=True, slots=True)
class LDConfig:
    """LD on GFL as released (HikariTJU/LD, ``ld_r101_r18_gflv1``-style configs)."""

    main_weight: float = 0.25
    """Loss weight of LD on the ATSS positives."""
    main_temperature: float = 10.0
    """Temperature of the main LD."""
    main_avg_factor: float = 4.0
    """avg_factor of the main LD: the released code's constant (not the number of positives)."""
    vlr_weight: float = 0.25
    """Loss weight of LD on the valuable localization region."""
    vlr_avg_factor: float = 16.0
    """avg_factor of the VLR LD: the released code's constant."""
    vlr_temperature: float = 10.0
    """Temperature of the VLR LD."""
    kd_weight: float = 10.0
    """Loss weight of the classification KD at the positives."""
    kd_temperature: float = 2.0
    """Temperature of the classification KD."""
    alpha: float = 0.25
    """Lower bound of the VLR as a fraction of the ATSS threshold."""
    topk: int = 9
    """ATSS candidates per level per GT."""
    vlr_diou: str = "standard"
    """DIoU flavour of `detcore.assign.vlr_region` (``standard`` or ``released``)."""
    avg_factor_images: int = 2
    """Images the constant avg factors above are meant for. The released code divides each
    level's LD sum over one GPU's batch by 4 (VLR: 16) and averages gradients over GPUs;
    its configs train 2 images per GPU (mmdetection's LD configs; the authors' r18 config
    3). So a batch of B images here divides by ``avg_factor * B / avg_factor_images``,
    which keeps LD's strength per image, and relative to the detection losses (normalised
    by the number of positives), whatever the batch size. 0 divides the whole batch by the
    constants (at batch 16, 8x the released strength)."""
    im_weight: float = 2.0
    """Loss weight of the release's feature imitation (term ``ld_im``, off unless enabled):
    ``loss_im=dict(type='IMLoss', loss_weight=2.0)`` in the authors' training configs."""
    im_ratio: float = 0.5
    """psi of the ``finegrained`` imitation region (`detcore.assign.imitation_region`)."""
    im_normalize: str = "teacher_rms"
    """Feature scaling of the imitation (`student_trainer.losses.FeatureImitation`): ``teacher_rms``
    (a deviation from the release, as FGD's) or ``none`` (the release)."""


@dataclass(frozen=True, slots=True)
class BCDConfig:
    """BCD on GFL as released (TinyTigerPan/BCKD)."""

    cls_weight: float = 1.0
    """Loss weight of `bcd_cls_loss`."""
    iou_weight: float = 4.0
    """Loss weight of `iou_ld_loss`."""
    beta: float = 1.0
    """Exponent of the modulating factor of `bcd_cls_loss`."""
    topk: int = 9
    """ATSS candidates per level per GT (positives give the avg_factor)."""


@dataclass(frozen=True, slots=True)
class FGDConfig:
    """FGD hyper-parameters (RetinaNet/GFL defaults; `for_family` for the others)."""

    temperature: float = 0.5
    """Temperature of the attentions."""
    alpha: float = 1e-3
    """Weight of the foreground feature loss."""
    beta: float = 5e-4
    """Weight of the background feature loss."""
    gamma: float = 5e-4
    """Weight of the attention (mask) loss."""
    lambda_: float = 5e-6
    """Weight of the global relation loss."""
    normalize: str = "teacher_rms"
    """``teacher_rms``: features divided by the teacher level's RMS first (this recipe's choice, a
    deviation; `FGDLoss` itself defaults to the release); ``none``: as released."""

    @classmethod
    def for_family(cls, family: str) -> "FGDConfig":
        """Released values of ``retinanet``, ``gfl`` or ``fcos``."""
        if family not in FGD_DEFAULTS:
            raise ConfigError(f"FGDConfig.for_family(family=) expects one of {sorted(FGD_DEFAULTS)}. Got {family!r}.")
        return cls(**FGD_DEFAULTS[family])


@dataclass(frozen=True, slots=True)
class HGDConfig:
    """HGD (this project's interpretation, see `student_trainer.losses.hgd`)."""

    weight: float = 1.0
    """Loss weight of the HGD total. Not from the paper (no code or numbers available)."""
    background_weight: float = 0.5
    """rho: mass of the whole background relative to one object (micro weights)."""
    macro_power: float = 1.0
    """gamma of the macro stage weights (0: equal weights)."""
    stages: tuple[str, ...] = DEFAULT_HGD_STAGES
    """Stages distilled: backbone c3..c5 and FPN p3..p7."""

@dataclass(frozen=True)
class DataConfig:
    """Training and validation data."""

    store: str = ""
    """Label store URL or path (required for the store and read-through sources; with the
    remote and in-process sources it is still where the views to train on are listed,
    unless ``views_from_store`` is False)."""
    annotations: str = ""
    """COCO annotation file of the training images."""
    images: str = ""
    """Folder that the training annotations' ``file_name`` is relative to."""
    val_annotations: str | None = None
    """COCO annotation file for evaluation; None skips COCO AP."""
    val_images: str | None = None
    """Folder of the validation images."""
    canvas: tuple[int, int] | None = None
    """Canvas ``(H, W)`` for views planned without a store (remote / in-process sources
    without ``store``) and the canvas the student expects; None takes the store's."""
    scales: tuple[float, ...] = (1.0,)
    """View scales (fractions of the fit scale) planned when there is no store."""
    flip: bool = True
    """Plan a flipped twin of every view when there is no store."""
    strict_hash: bool = False
    """Raise on an image whose content hash differs from the store's record, instead of
    skipping it and reporting it by id."""
    photometric: bool = False
    """Student-side photometric augmentation (brightness, contrast, saturation jitter of
    the rendered canvas). Off by default: the teacher's targets were computed on the
    unaugmented pixels, so turning it on is an approximation, recorded as such."""
    num_workers: int = 2
    """DataLoader worker processes (0 loads in the training process)."""
    max_images: int | None = None
    """Train on the first N images of the store only (tiny runs, benchmarks)."""
    storage_options: tuple[tuple[str, Any], ...] = ()
    """fsspec options of a remote store, ``((key, value), ...)``, e.g. ``(("endpoint_url", "http://minio:9000"),)``.
    Credentials belong in the environment (``AWS_ACCESS_KEY_ID`` ...); values under secret
    keys (`SECRET_OPTION_KEYS`) are left out of what a run writes (`TrainRunConfig.to_record`)."""


@dataclass(frozen=True)
class StudentConfig:
    """The student detector (a `detcore.models` architecture)."""

    arch: str = "gfl_tiny"
    """Architecture name for `detcore.models.build_detector`."""
    fpn_channels: int | None = None
    """FPN width; None keeps the architecture's default."""
    head_channels: int | None = None
    """GFL head width; None keeps the architecture's default."""
    num_convs: int | None = None
    """Head tower depth; None keeps the architecture's default."""
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    """FPN strides; must equal the store's (checked at start)."""
    reg_max: int = 16
    """R of the edge distributions; must equal the store's (checked at start)."""
    init: str | None = None
    """Optional detcore checkpoint to initialise the student from (weights only)."""
    backbone_weights: str | None = None
    """ResNet state_dict file (torchvision's ImageNet layout) to start the backbone from; never downloaded.
    The stem and first stage are then frozen and BatchNorm statistics kept (mmdetection's convention)."""
    train_backbone_all: bool = False
    """With ``backbone_weights``: train the stem, the first stage and BatchNorm too."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation schedule (the same for every row of a comparison table)."""

    epochs: int = 12
    """Passes over the images (each pass samples one stored view per image)."""
    iters: int | None = None
    """Stop after this many optimizer steps, whatever ``epochs`` says (None: run all epochs)."""
    batch_size: int = 8
    """Images per step (per worker with Ray Train)."""
    lr: float | None = None
    """Peak learning rate; default 2e-3 for AdamW, 0.01 for SGD (as `detcore.train`)."""
    optimizer: str = "adamw"
    """``adamw`` (linear warm-up, cosine decay to 1 %) or ``sgd`` (momentum 0.9, x0.1 at 8/12
    and 11/12): the schedules of `detcore.train`, so a student baseline trained here and
    one trained by `distill detector train` follow the same recipe."""
    weight_decay: float | None = None
    """Default 0.05 for AdamW, 1e-4 for SGD; never on biases and norm parameters."""
    warmup_iters: int | None = None
    """Linear warm-up steps; default min(500, 10 % of the run)."""
    grad_clip: float | None = 35.0
    """Max global gradient norm (mmdetection's GFL value); None disables clipping."""
    seed: int = 0
    """Seeds the student's initialisation, the distillation modules and the per-epoch view sampling."""
    amp: bool = True
    """Mixed precision for the student forward on CUDA (ignored on CPU); losses stay float32."""

    @property
    def peak_lr(self) -> float:
        return float(self.lr) if self.lr is not None else OPTIMIZER_DEFAULTS[self.optimizer]["lr"]

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return OPTIMIZER_DEFAULTS[self.optimizer]["weight_decay"]


@dataclass(frozen=True)
class LossConfig:
    """Which distillation terms are on, and their recipes (weights, temperatures)."""

    enabled: tuple[str, ...] = ("ld_main", "ld_vlr", "ld_kd")
    """Terms to apply, a subset of `LOSS_TERMS`; empty is the no-distillation baseline."""
    ld: LDConfig = field(default_factory=LDConfig)
    """Main LD, VLR LD and KD weights and temperatures (also those of ``ld_im``)."""
    bcd: BCDConfig = field(default_factory=BCDConfig)
    """BCD's weights."""
    fgd: FGDConfig = field(default_factory=FGDConfig)
    """FGD's weights and temperature."""
    hgd: HGDConfig = field(default_factory=HGDConfig)
    """HGD's weight and stages."""
    detector_weight: float = 1.0
    """Multiplier of the student's own detection loss (QFL + DFL + GIoU)."""

    def uses(self, *terms: str) -> bool:
        """True if any of ``terms`` is enabled."""
        return any(t in self.enabled for t in terms)

    def groups_read(self, available: Collection[str] | None = None, region_groups: Collection[str] = ()) -> tuple[str, ...]:
        """Target groups the enabled terms read (`LOSS_TARGET_GROUPS`; HGD's by its stages), in store order.

        ``available``: the groups a store holds; ``region_groups``: those it holds only in its
        region. BCD reads ``edges`` when the store has no ``box`` at every point.
        """
        stages = self.hgd.stages if "hgd" in self.enabled else None
        return loss_target_groups(
            self.enabled, available=None if available is None else tuple(available), region_groups=tuple(region_groups),
            hgd_stages=stages,
        )

    def bcd_box_group(self, available: Collection[str] | None = None, region_groups: Collection[str] = ()) -> str:
        """The group BCD's IoU term reads the teacher's boxes from at every point: ``box``, or
        ``edges`` where the store holds no ``box`` at every point (`groups_read`)."""
        read = loss_target_groups(
            ("bcd",), available=None if available is None else tuple(available), region_groups=tuple(region_groups)
        )
        return "edges" if "edges" in read else "box"

    @property
    def target_groups(self) -> tuple[str, ...]:
        """`groups_read` of a store that holds every group."""
        return self.groups_read()


@dataclass(frozen=True)
class SourceConfig:
    """Where the teacher's targets come from."""

    kind: str = "store"
    """``store`` (offline, default), ``remote`` (the endpoint), ``read-through`` (store, misses
    from the endpoint) or ``inprocess`` (teacher in this process: a comparison baseline only)."""
    endpoint: str | None = None
    """Base URL of the teacher endpoint (remote and read-through)."""
    token: str | None = None
    """Bearer token for the endpoint; None reads ``$DISTILLERY_TOKEN`` (`sources.endpoint_token`)."""
    teacher: str | None = None
    """Teacher checkpoint (in-process source only)."""
    class_map: str | None = None
    """In-process source: JSON file of teacher class name -> dataset category name
    (`detcore.classes.read_class_map`); the teacher's classes are mapped to the training
    annotations' categories by name as `distill precompute` maps them."""
    allow_missing_classes: bool = False
    """In-process source: accept dataset categories the teacher lacks (left out of class distillation)."""
    timeout_s: float = 120.0
    """HTTP timeout per request."""
    max_retries: int = 6
    """Retries of a request answered 503 or failing to connect (bounded exponential backoff)."""


@dataclass(frozen=True)
class ScheduleConfig:
    """Logging, evaluation and checkpoint cadence."""

    eval_every: int = 0
    """Evaluate COCO AP every N epochs (0: only at the end)."""
    checkpoint_every: int = 200
    """Write ``last.pt`` every N steps (and at the end of every epoch)."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<out>/tb``."""


@dataclass(frozen=True)
class TrainRunConfig:
    """Everything one `distill train` run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student detector."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation schedule."""
    losses: LossConfig = field(default_factory=LossConfig)
    """Distillation terms and weights."""
    source: SourceConfig = field(default_factory=SourceConfig)
    """Where targets come from."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Logging, evaluation and checkpoint cadence."""
    out: str = "runs/student"
    """Output folder: checkpoints, metrics.jsonl, tb/, results.json."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``."""
    num_threads: int | None = None
    """torch intra-op threads of the training process (None: torch's default)."""
    num_ray_workers: int = 0
    """Ray Train data-parallel workers; 0 trains in this process."""
    address: str | None = None
    """Ray cluster address for Ray Train (None: a local cluster)."""

    def to_dict(self) -> dict[str, Any]:
        """Everything, secrets included (for `config_from_dict` in Ray Train workers)."""
        return _to_jsonable(self)

    def to_record(self) -> dict[str, Any]:
        """`to_dict` without secrets (the token, secret storage options): what run_config.json,
        results.json and the checkpoints keep."""
        record = self.to_dict()
        if record["source"]["token"] is not None:
            record["source"]["token"] = REDACTED
        record["data"]["storage_options"] = [
            [key, REDACTED if is_secret_option(key) else value] for key, value in record["data"]["storage_options"]
        ]
        return record

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def approximations(self) -> list[str]:
        """What makes this run differ from training on exactly what the teacher saw."""
        notes = []
        if self.data.photometric:
            notes.append("photometric augmentation on the student side: teacher targets were computed on unjittered pixels")
        return notes


REDACTED = "<redacted>"
SECRET_OPTION_KEYS = ("key", "secret", "token", "password", "session", "credential", "access_key", "secret_key")
"""Storage option keys whose values are secrets (matched as parts of the lower-cased key)."""


def is_secret_option(key: str) -> bool:
    """Whether a storage option ``key`` names a secret (``secret``, ``aws_secret_access_key``, ``token`` ...)."""
    lowered = key.lower()
    return any(part in lowered for part in SECRET_OPTION_KEYS)


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


def _coerce(value: Any, annotation: Any, default: Any, where: str) -> Any:
    """Coerce a JSON/CLI value to a field's type (strings from ``--set`` included)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], default, where) if len(non_none) == 1 else value
    if dataclasses.is_dataclass(annotation):
        return _dataclass_from(annotation, value, where)
    if origin is tuple:
        if isinstance(value, Mapping):  # ((key, value), ...) fields may be written as a mapping
            value = list(value.items())
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v.strip()] if args[0] is int else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"TrainRunConfig({where}=) expects a list. Got {value!r}.")
        if len(args) > 1 and args[1] is not Ellipsis and len(value) == len(args):  # one type per item
            return tuple(_coerce(v, a, None, where) for v, a in zip(value, args))
        item_type = args[0]
        return tuple(_coerce(v, item_type, None, where) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"TrainRunConfig({where}=) expects true or false. Got {value!r}.")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"TrainRunConfig({where}=) expects {annotation.__name__}. Got {value!r}.") from error
    return value


def _dataclass_from(cls: type, data: Any, where: str) -> Any:
    """Build ``cls`` from a mapping over its defaults; unknown keys are an error."""
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"TrainRunConfig({where or cls.__name__}=) expects a mapping. Got {data!r}.")
    defaults = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"TrainRunConfig({where + '.' if where else ''}{unknown[0]}=) is not a known key. "
            f"Known keys{' of ' + where if where else ''}: {sorted(fields)}."
        )
    values = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(value, hints[name], getattr(defaults, name), key)
    return dataclasses.replace(defaults, **values)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"TrainRunConfig({dotted}=) addresses inside a value that is not a section.")
    node[keys[-1]] = value


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) run config file into a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"build_run_config(config_file=) expects a readable file. Got {path}: {error}.") from error
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as error:  # yaml.YAMLError or json.JSONDecodeError
        raise ConfigError(f"build_run_config(config_file=) expects valid JSON or YAML. Got {path}: {error}.") from error
    if not isinstance(data, dict):
        raise ConfigError(f"build_run_config(config_file=) expects a mapping at top level. Got {type(data).__name__} in {path}.")
    return data


# CLI flag -> dotted config key. Flags left at None are not overrides.
CLI_KEYS = {
    "store": "data.store",
    "annotations": "data.annotations",
    "images": "data.images",
    "val_annotations": "data.val_annotations",
    "val_images": "data.val_images",
    "canvas": "data.canvas",
    "strict_hash": "data.strict_hash",
    "photometric": "data.photometric",
    "num_workers": "data.num_workers",
    "max_images": "data.max_images",
    "storage_option": "data.storage_options",
    "student": "student.arch",
    "student_init": "student.init",
    "backbone_weights": "student.backbone_weights",
    "train_backbone_all": "student.train_backbone_all",
    "epochs": "optim.epochs",
    "iters": "optim.iters",
    "batch_size": "optim.batch_size",
    "lr": "optim.lr",
    "optimizer": "optim.optimizer",
    "seed": "optim.seed",
    "losses": "losses.enabled",
    "source": "source.kind",
    "endpoint": "source.endpoint",
    "token": "source.token",
    "teacher": "source.teacher",
    "class_map": "source.class_map",
    "allow_missing_classes": "source.allow_missing_classes",
    "eval_every": "schedule.eval_every",
    "checkpoint_every": "schedule.checkpoint_every",
    "log_every": "schedule.log_every",
    "out": "out",
    "device": "device",
    "threads": "num_threads",
    "ray_workers": "num_ray_workers",
    "address": "address",
}


def build_run_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> TrainRunConfig:
    """The one place a run config is made: defaults < file < overrides < ``--set`` pairs.

    Args:
        config_file: JSON or YAML file with any subset of the sections of `TrainRunConfig`.
        overrides: flat CLI values by flag name (`CLI_KEYS`) or by dotted key
            (``"optim.lr"``); None values are ignored.
        sets: ``"section.field=value"`` strings (``--set``), e.g. ``"losses.fgd.alpha=2e-3"``.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or an inconsistent setting.
    """
    tree: dict[str, Any] = load_config_file(config_file) if config_file else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        dotted = CLI_KEYS.get(key, key)
        if dotted == "losses.enabled":
            value = parse_losses(value)
        _set_path(tree, dotted, value)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"build_run_config(sets=) expects 'section.field=value'. Got {item!r}.")
        key, value = item.split("=", 1)
        _set_path(tree, key.strip(), _parse_scalar(value.strip()))
    if "losses" in tree and "enabled" in tree["losses"]:
        tree["losses"]["enabled"] = parse_losses(tree["losses"]["enabled"])
    config = _dataclass_from(TrainRunConfig, tree, "")
    validate_run_config(config)
    return config


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_dict(data: Mapping[str, Any]) -> TrainRunConfig:
    """Rebuild a config from `TrainRunConfig.to_dict` (checkpoints, Ray workers)."""
    return _dataclass_from(TrainRunConfig, dict(data), "")


def validate_run_config(config: TrainRunConfig) -> None:
    """Raise `ConfigError` for settings that cannot work together."""
    data, optim, source = config.data, config.optim, config.source
    if not data.annotations or not data.images:
        raise ConfigError("TrainRunConfig(data.annotations=, data.images=) expects the training annotations and image folder. Got none.")
    if source.kind not in SOURCE_KINDS:
        raise ConfigError(f"TrainRunConfig(source.kind=) expects one of {list(SOURCE_KINDS)}. Got {source.kind!r}.")
    if source.kind in ("store", "read-through") and not data.store:
        raise ConfigError(f"TrainRunConfig(data.store=) expects a label store for source {source.kind!r}. Got none; pass --store.")
    if source.kind in ("remote", "read-through") and not source.endpoint:
        raise ConfigError(f"TrainRunConfig(source.endpoint=) expects the teacher endpoint URL for source {source.kind!r}. Got none; pass --endpoint.")
    if source.kind == "inprocess" and not source.teacher:
        raise ConfigError("TrainRunConfig(source.teacher=) expects a teacher checkpoint for the in-process source. Got none; pass --teacher.")
    if source.kind in ("remote", "inprocess") and not data.store and data.canvas is None:
        raise ConfigError(
            f"TrainRunConfig(data.canvas=) expects a canvas when source {source.kind!r} runs without a store to take views from. "
            "Got none; pass --canvas HxW or --store."
        )
    if bool(data.val_annotations) != bool(data.val_images):
        raise ConfigError("TrainRunConfig(data.val_annotations=, data.val_images=) expects both or neither. Got only one.")
    if optim.optimizer not in OPTIMIZERS:
        raise ConfigError(f"TrainRunConfig(optim.optimizer=) expects one of {list(OPTIMIZERS)}. Got {optim.optimizer!r}.")
    for name, value, low in (
        ("optim.epochs", optim.epochs, 1),
        ("optim.batch_size", optim.batch_size, 1),
        ("data.num_workers", data.num_workers, 0),
        ("schedule.checkpoint_every", config.schedule.checkpoint_every, 1),
        ("schedule.log_every", config.schedule.log_every, 1),
        ("schedule.eval_every", config.schedule.eval_every, 0),
        ("num_ray_workers", config.num_ray_workers, 0),
    ):
        if value < low:
            raise ConfigError(f"TrainRunConfig({name}=) expects an integer >= {low}. Got {value}.")
    if optim.iters is not None and optim.iters < 1:
        raise ConfigError(f"TrainRunConfig(optim.iters=) expects a positive integer or None. Got {optim.iters}.")
    if optim.lr is not None and not optim.lr > 0:
        raise ConfigError(f"TrainRunConfig(optim.lr=) expects a positive number. Got {optim.lr}.")
    if optim.warmup_iters is not None and optim.warmup_iters < 0:
        raise ConfigError(f"TrainRunConfig(optim.warmup_iters=) expects a non-negative integer. Got {optim.warmup_iters}.")
    unknown = [t for t in config.losses.enabled if t not in LOSS_TERMS]
    if unknown:
        raise ConfigError(f"TrainRunConfig(losses.enabled=) expects terms from {list(LOSS_TERMS)}. Got {unknown}.")
    if config.losses.ld.avg_factor_images < 0:
        raise ConfigError(
            "TrainRunConfig(losses.ld.avg_factor_images=) expects a non-negative integer (0: the constants for the whole "
            f"batch). Got {config.losses.ld.avg_factor_images}."
        )
    student = config.student
    if student.backbone_weights and student.arch == "gfl_tiny":
        raise ConfigError(
            "TrainRunConfig(student.backbone_weights=) is for ResNet students (gfl_r18, gfl_r34, gfl_r50, gfl_r101). "
            "Got student.arch='gfl_tiny'; pass --student gfl_r18 (or another ResNet) with --backbone-weights."
        )
    if student.train_backbone_all and not student.backbone_weights:
        raise ConfigError(
            "TrainRunConfig(student.train_backbone_all=) applies to a pretrained backbone. Got no "
            "student.backbone_weights; pass --backbone-weights FILE (a backbone from scratch trains everything)."
        )
    if data.canvas is not None and (len(data.canvas) != 2 or min(data.canvas) < 1):
        raise ConfigError(f"TrainRunConfig(data.canvas=) expects (H, W) with positive sides. Got {data.canvas}.")
