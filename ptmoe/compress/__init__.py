"""Model compression for limited hardware: pruning (Wanda) and, alongside, distillation.

fp32/bf16 checkpoint ──► prune_wanda(model, calibration texts) ──► sparse weights ──► save ──► 4-bit load / LoRA

The calibration pass itself (texts, tokenizer, unpadded batches, input norms per linear) is `ptmoe.calibration`.
"""

from .distillation import distill, distillation_loss, student_teacher_gap
from .pruning import (
    PruningReport,
    nm_mask,
    prunable_linears,
    prune_wanda,
    save_pruned,
    wanda_mask,
    wanda_scores,
)

__all__ = [
    "PruningReport",
    "distill",
    "distillation_loss",
    "nm_mask",
    "prunable_linears",
    "prune_wanda",
    "save_pruned",
    "student_teacher_gap",
    "wanda_mask",
    "wanda_scores",
]
