"""The healing objective: KL(teacher || student) of the next-token distributions, averaged over tokens.

The teacher is the original model, frozen and run without gradients on the same batch; only the student's
trainable parameters learn. Matching the whole distribution (not the one observed token) is what heals: it needs
no labels, so any calibration text serves, and a student that already equals its teacher gets no gradient at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``sum_v p_t(v) (log p_t(v) - log p_s(v))``, computed in float32."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / student.shape[0]


def kl_loss(teacher: nn.Module):
    """``loss(student, batch)`` for ``finetune.train``: the teacher follows the student to its device once."""
    teacher.eval().requires_grad_(False)

    def loss(student: nn.Module, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        if next(teacher.parameters()).device != ids.device:
            teacher.to(ids.device)
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        return kl_per_token(student(input_ids=ids, use_cache=False).logits, target)

    return loss
