"""The lossless check: every rewrite is compared against the model's own outputs before it.

The logit scale is the largest absolute logit of the original, so the tolerance is relative and means the same
for a tiny random model and a 7B one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# Relative tolerance by the dtype the model computes in. fp32's is the product promise (1e-4); half precisions
# round every rewritten weight to 8 or 11 mantissa bits, so an exact rewrite still moves logits by that much.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@dataclass
class Check:
    max_abs_diff: float
    logit_scale: float
    relative_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def model_outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The tensor a user looks at: logits where the model has a head, a diffusion UNet's predicted noise
    (``sample``), else the last hidden state."""
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "sample"):
        tensor = getattr(out, name, None)
        if tensor is not None:
            return tensor.float()
    return out.last_hidden_state.float()


def compare(reference: torch.Tensor, model: nn.Module, inputs: dict) -> Check:
    current = model_outputs(model, inputs)
    diff = (current - reference).abs().max().item()
    scale = reference.abs().max().item() or 1.0
    dtype = next(model.parameters()).dtype
    return Check(diff, scale, diff / scale, TOLERANCE.get(dtype, 1e-4))
