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


def mean_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """KL(teacher || student) per token over token ``windows`` (n, seqlen) that neither model trains on: the
    healing objective read as a held-out metric, so that models healed differently (or fitted to another's
    healing) compare on the same text. Every position counts (a next-token distribution needs no label); the sum
    runs in float64 so that 40 x 512 tokens add up without losing digits."""
    teacher.eval()
    student.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    device = next(student.parameters()).device
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size].to(device)
            count = ids.numel()
            target = teacher(input_ids=ids, use_cache=False).logits
            total += kl_per_token(student(input_ids=ids, use_cache=False).logits, target).double() * count
            tokens += count
    return (total / tokens).item()
