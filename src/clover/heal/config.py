"""What a healing run trains, and how long: the settings ``clover heal`` takes, checked before any weights load."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CloverError
from ..finetune.train import FinetuneConfig

METHODS = ("clover", "lora", "pissa")
DEFAULT_TARGETS = ("qk", "vo", "up")  # ``rope`` on top: not separated from this in mla_quality (BENCHMARKS.md)


@dataclass
class HealConfig:
    """Settings of ``heal`` / ``distill``.

    ``method``: ``clover`` trains a d x d core per head pair between frozen singular vectors (in an MLA conversion
    the query/key pairs without rotation and the value/output pairs over the latent are exact pairs) and per
    head-sized block of the MLP up projection; ``lora`` / ``pissa`` (peft) adapt the same modules. ``lora_r`` None
    matches LoRA's trainable count to what CLOVER trains on the same targets (the closest rank), so the methods
    compare at equal budgets. ``targets`` are CLOVER's names (``finetune.targets``). The latent's down projection
    and every norm are never trained, so the format's shared rotated key and its linear latent norm stay as
    converted. CLOVER's Q-K cores act on the unrotated pairs; the ``rope`` target adds each head's
    rotated query rows (a rope x rope core before RoPE, the only per-head freedom the shared key leaves). LoRA /
    PiSSA adapt ``q_proj`` whole, rotated rows included, with or without ``rope`` (peft adapts modules, not rows):
    ``rope`` only raises the budget their rank is matched to.

    The objective is the KL divergence from the teacher's next-token distribution to the student's, per token, on
    windows of calibration text: no labels are read.
    """

    method: str = "clover"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_r: int | None = None
    steps: int = 40
    lr: float = 1e-3
    lr_scales: tuple[tuple[str, float], ...] | str | dict = ()  # target -> multiplier of lr (``finetune.lr_scales``)
    adam_eps: float | None = None  # Adam's epsilon (None: the Trainer's default)
    core_scale: str = "unit"  # CLOVER's cores: "spectrum" steps strong directions more (``attach.TuneConfig``)
    batch_size: int = 2
    seqlen: int = 256
    warmup_steps: int = 0
    save_steps: int = 20
    logging_steps: int = 10
    seed: int = 0
    resume: bool = True
    progress: bool = True

    def check(self) -> None:
        if self.method not in METHODS:
            raise CloverError(f"unknown healing method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.lora_r is not None and self.lora_r < 1:
            raise CloverError(f"--lora-r {self.lora_r} must be at least 1 (or leave it out to match CLOVER's budget)")
        if self.seqlen < 2:
            raise CloverError(f"--seqlen {self.seqlen} leaves no next token to match: use at least 2")
        self.finetune(1, teacher="check", data="check").check()

    def finetune(self, lora_r: int, teacher: str, data: str) -> FinetuneConfig:
        """The same run as ``finetune`` sees it: every setting here, the teacher and the data are its identity, so a
        checkpoint is only resumed by a run that agrees on all of them."""
        return FinetuneConfig(method=self.method, targets=tuple(self.targets), lora_r=lora_r, steps=self.steps,
                              lr=self.lr, lr_scales=self.lr_scales, adam_eps=self.adam_eps,
                              core_scale=self.core_scale, batch_size=self.batch_size, seqlen=self.seqlen,
                              warmup_steps=self.warmup_steps, save_steps=self.save_steps,
                              logging_steps=self.logging_steps, seed=self.seed, resume=self.resume, data=data,
                              teacher=teacher)
