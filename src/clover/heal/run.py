"""``heal`` / ``distill``: train a student toward its teacher through ``finetune`` and check what came back.

``distill`` works on any causal LM clover can fine-tune (the benchmark's control tunes the original model toward
itself with it); ``heal`` first checks that the student is a ``clover mla`` conversion of a model with the
teacher's vocabulary, since healing anything else against that teacher means nothing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..errors import CloverError
from ..finetune import clover_parameter_count, lora_parameter_count, target_modules
from ..finetune.train import tensor_bytes, train
from .config import HealConfig
from .distill import kl_loss

MLA_MARKER = "clover_linear_latent_norm"  # set by clover mla on every DeepSeek-V3 it writes (mla/deepseek.py)


@dataclass
class HealReport:
    method: str
    targets: tuple[str, ...]
    trainable: int  # what the method trained
    clover_budget: int  # what CLOVER trains on the same targets (LoRA's rank is matched to it by default)
    lora_r: int | None  # the rank LoRA / PiSSA used (None for CLOVER)
    steps: int
    train_kl: float | None  # mean KL over the run (the Trainer's training loss)
    heldout_kl: float | None  # mean KL over the last quarter, on windows not yet trained on (``late_heldout_loss``)
    wall_s: float
    resumed_from: str | None
    digest: str  # sha256 of the merged weights
    unchanged: int  # tensors outside the trained modules, checked bit-identical after merging
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def is_mla_conversion(config) -> bool:
    """Whether a transformers config is a ``clover mla`` output (read before any weights load)."""
    return getattr(config, "model_type", None) == "deepseek_v3" and bool(getattr(config, MLA_MARKER, False))


def check_student(config, student_name: str = "the model") -> None:
    if not is_mla_conversion(config):
        kind = getattr(config, "model_type", None) or "model"
        raise CloverError(f"{student_name} is not an MLA conversion (a {kind} model without {MLA_MARKER} in its "
                          "config): convert the original with `clover mla` first and heal that output")


def check_pair(student_config, teacher_config, student_name: str = "the model",
               teacher_name: str = "the teacher") -> None:
    """The student must be a ``clover mla`` output of a model shaped like the teacher (one KL over the same tokens)."""
    check_student(student_config, student_name)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        mine, theirs = getattr(student_config, name, None), getattr(teacher_config, name, None)
        if mine != theirs:
            raise CloverError(f"{student_name} has {name} {mine} but {teacher_name} has {theirs}: pass as --teacher "
                              "the model the conversion was made from")


def lora_rank_for(model: nn.Module, targets, budget: int) -> int:
    """The LoRA rank whose trainable count on the targets' modules is closest to ``budget``."""
    per_rank = lora_parameter_count(model, target_modules(model, targets), 1)
    return max(1, round(budget / per_rank))


def _digests(model: nn.Module, skip: list[str]) -> dict[str, str]:
    """sha256 of every tensor outside the modules in ``skip`` (the ones a method may change)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        out[name] = hashlib.sha256(tensor_bytes(tensor)).hexdigest()
    return out


def distill(student: nn.Module, teacher: nn.Module, tokenizer, windows, config: HealConfig,
            run_dir: str | os.PathLike, student_name: str = "model", teacher_name: str = "teacher",
            data_name: str = "data", log=print) -> tuple[nn.Module, HealReport]:
    """Tune ``student`` (in place) so its next-token distribution matches ``teacher``'s on ``windows``; merged.
    The teacher is frozen in place (eval mode, no gradients)."""
    config.check()
    if student.config.vocab_size != teacher.config.vocab_size:
        raise CloverError(f"{student_name} and {teacher_name} have different vocabularies "
                          f"({student.config.vocab_size} vs {teacher.config.vocab_size}): distil between models "
                          "that share a tokenizer")
    budget = clover_parameter_count(student, config.targets)
    lora_r = config.lora_r or lora_rank_for(student, config.targets, budget)
    trained = target_modules(student, config.targets)
    fixed = _digests(student, trained)
    run = config.finetune(lora_r, teacher=teacher_name, data=data_name)
    merged, result = train(student, tokenizer, windows, run, Path(run_dir), model_name=student_name,
                           progress=config.progress, log=log, loss=kl_loss(teacher))
    after = _digests(merged, trained)
    moved = [name for name, digest in fixed.items() if after.get(name) != digest]
    if moved:
        raise CloverError(f"internal: healing changed {len(moved)} tensors outside the trained modules "
                          f"({moved[:3]}); nothing was saved")
    return merged, HealReport(config.method, tuple(config.targets), result.trainable, budget,
                              None if config.method == "clover" else lora_r, result.steps, result.train_loss,
                              result.heldout_loss,
                              result.wall_s, result.resumed_from, result.digest, len(fixed), result.details)


def heal(student: nn.Module, teacher: nn.Module, tokenizer, windows, config: HealConfig,
         run_dir: str | os.PathLike, student_name: str = "model", teacher_name: str = "teacher",
         data_name: str = "data", log=print) -> tuple[nn.Module, HealReport]:
    """``distill`` for a ``clover mla`` output and the model it was converted from: the result is the same stock
    DeepSeek-V3 layout (the latent's down projection and norms untouched), ready for ``clover export``."""
    check_pair(student.config, teacher.config, student_name, teacher_name)
    return distill(student, teacher, tokenizer, windows, config, run_dir, student_name, teacher_name, data_name, log)
