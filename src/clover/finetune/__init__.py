"""CLOVER fine-tuning: train a d x d core per head group between frozen orthogonal factors, then merge it back.

``attach`` / ``merge_`` work on any model clover has an adapter for (pruned ``clover_*`` models included);
``train.finetune`` runs it (or LoRA / PiSSA / DoRA from peft, or full fine-tuning) on the Hugging Face Trainer;
``reach.project_`` fits the cores to another method's tuning, to see what of it they could have made.
"""

from .attach import (
    AttachReport,
    TuneConfig,
    attach,
    is_attached,
    is_decomposed_dir,
    load_decomposed,
    merge_,
    save_decomposed,
    trainable_parameters,
)
from .reach import ReachReport, input_moments, project_
from .targets import TARGETS, clover_parameter_count, default_targets, lora_parameter_count, match_lora, target_modules

__all__ = [
    "TARGETS", "AttachReport", "TuneConfig", "attach", "clover_parameter_count", "default_targets", "is_attached",
    "is_decomposed_dir", "load_decomposed", "lora_parameter_count", "match_lora", "merge_", "save_decomposed",
    "target_modules", "trainable_parameters", "ReachReport", "input_moments", "project_",
]
