"""Healing: tune a converted model to match the original's next-token distribution, then merge it back.

``heal(mla_model, original, tokenizer, windows, HealConfig(method="clover"), run_dir) -> (model, HealReport)``:
config.py (settings and run identity), distill.py (the KL objective against the teacher, and ``mean_kl`` to read
it on held-out windows), run.py (checks that the student is a ``clover mla`` output, the matched LoRA budget,
training through ``finetune``, and the check that every tensor the engine format fixes came back unchanged).
"""

from .config import METHODS, HealConfig
from .distill import mean_kl
from .run import HealReport, distill, heal

__all__ = ["METHODS", "HealConfig", "HealReport", "distill", "heal", "mean_kl"]
