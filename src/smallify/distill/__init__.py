"""Knowledge distillation: a student learns from a teacher's soft labels (and optionally its features)."""
from smallify.distill.kd import KD, distill, kd_loss

__all__ = ["KD", "distill", "kd_loss"]
