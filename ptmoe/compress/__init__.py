"""Model compression for limited hardware: distillation (and, alongside, pruning)."""

from .distillation import distill, distillation_loss, student_teacher_gap

__all__ = ["distill", "distillation_loss", "student_teacher_gap"]
