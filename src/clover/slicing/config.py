"""What a slicing run should do: how much of the hidden dimension to remove, and from which calibration text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CloverError


@dataclass
class SliceConfig:
    """Settings of ``slice_``.

    ``ratio``: fraction of the hidden dimension removed, in [0, 1) (0: the rotation alone, an exact change of basis).
    The kept width is rounded to a multiple of ``multiple_of`` (GPU matmul kernels want multiples of 8; 1 keeps the
    exact count), and the report says when it was. ``calibration``: token ids (n, seqlen) whose residual stream
    gives the rotation (validation text, never the split you evaluate on); it needs at least as many tokens as the
    hidden size. ``verify``: compare the full-width rotated model's logits with the original before slicing.
    """

    ratio: float = 0.0
    calibration: torch.Tensor | None = None
    multiple_of: int = 8
    batch_size: int = 4
    compute_dtype: torch.dtype = torch.float64
    verify: bool = True
    progress: bool = True

    def check(self) -> None:
        """What can be said of the settings alone, before any model loads."""
        if not 0.0 <= self.ratio < 1.0:
            raise CloverError(f"--ratio must be in [0, 1) (the fraction of the hidden dimension removed), got "
                              f"{self.ratio}")
        if self.multiple_of < 1:
            raise CloverError(f"--multiple-of must be >= 1, got {self.multiple_of}")

    def width(self, hidden: int, reserved: int = 0, family_step: int = 1) -> tuple[int, str]:
        """The kept hidden width for a model of width ``hidden`` and why it differs from ``(1 - ratio) * hidden``.

        ``reserved`` dims are kept on top of any content (GPT-2's mean coordinate), so at least ``reserved + 1``
        must remain; ``family_step`` is a multiple the family's config needs on top of ``multiple_of``."""
        exact = hidden * (1.0 - self.ratio)
        if self.ratio == 0.0:
            return hidden, ""
        step = math.lcm(self.multiple_of, family_step)
        width = min(hidden, max(step, int(round(exact / step)) * step))
        if width <= reserved or exact < 1:
            raise CloverError(f"--ratio {self.ratio} leaves {exact:.1f} of {hidden} hidden dims (at least "
                              f"{reserved + 1} must stay): choose a smaller ratio")
        if width == hidden:
            raise CloverError(f"--ratio {self.ratio} removes {hidden - exact:.1f} of {hidden} hidden dims, which "
                              f"rounds to none at a multiple of {step}: choose a larger ratio or a smaller "
                              "--multiple-of")
        note = ""
        if abs(width - exact) > 1e-9:
            why = f"a multiple of {step}" + (", which the model's config needs" if step != self.multiple_of else "")
            note = f"--ratio {self.ratio} of {hidden} hidden dims leaves {exact:g}; kept {width} ({why}: ratio " \
                   f"{1 - width / hidden:.4f} applied)"
        return width, note
