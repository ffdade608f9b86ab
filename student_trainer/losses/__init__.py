"""Distillation losses: LD, BCD, FGD, HGD (one file each) and the released recipes.

LD's file also holds its release's optional feature imitation (``ld_im``).

The loss functions are pure functions of raw student outputs, teacher targets and GT;
they hold no loss weights (the recipes' config dataclasses in `student_trainer.config` do). Teacher inputs are
detached inside. Inputs in fp16 or bf16 are computed in float32 and every loss is float32.
Where a function takes ``weight`` and ``avg_factor`` it returns
``sum_i weight_i * l_i / avg_factor``; ``weight=None`` means 1 and ``avg_factor=None``
averages the weighted terms. See docs/losses.md for the formulas.
"""

from student_trainer.config import DEFAULT_HGD_STAGES, FGD_DEFAULTS, BCDConfig, FGDConfig, HGDConfig, LDConfig

from ._common import LossInputError
from .bcd import bcd_cls_loss, iou_ld_loss
from .fgd import FGDLoss, GcBlock, fgd_attention, fgd_masks
from .hgd import HGDLoss
from .ld import FeatureImitation, imitation_loss, kd_cls_loss, kd_kl_div, ld_loss
from .recipes import (
    OPTIMISED_KEYS,
    PointAssignment,
    assign_points,
    bcd_recipe,
    build_fgd_modules,
    build_hgd_module,
    build_imitation,
    fgd_recipe,
    hgd_recipe,
    imitation_points,
    ld_im_recipe,
    ld_recipe,
    view_regions,
)

__all__ = [
    "BCDConfig",
    "DEFAULT_HGD_STAGES",
    "FGDConfig",
    "FGDLoss",
    "FGD_DEFAULTS",
    "FeatureImitation",
    "GcBlock",
    "HGDConfig",
    "HGDLoss",
    "LDConfig",
    "LossInputError",
    "OPTIMISED_KEYS",
    "PointAssignment",
    "assign_points",
    "bcd_cls_loss",
    "bcd_recipe",
    "build_fgd_modules",
    "build_hgd_module",
    "build_imitation",
    "fgd_attention",
    "fgd_masks",
    "fgd_recipe",
    "hgd_recipe",
    "imitation_loss",
    "imitation_points",
    "iou_ld_loss",
    "kd_cls_loss",
    "kd_kl_div",
    "ld_im_recipe",
    "ld_loss",
    "ld_recipe",
    "view_regions",
]
