"""Attention-mixed input moments: what each head's softmax really does with the values.

A value error ``dV = x~ dW`` reaches the output as ``P_h x~ dW W_O,h``: the attention probabilities ``P_h`` of
head h mix it over positions first. So the moment that prices a value direction for head h is that of the mixed
inputs ``m_h = P_h x~``, not of ``x~`` itself (per-head V-O pruning measured the same, ``vo_whitening="mixed"``).
The probabilities come from the model's own eager attention (its returned weights), so no family's score
formula is written out here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import Adapter
from ..calibrate import feed


def mixed_moments(model: nn.Module, adapter: Adapter, batches: torch.Tensor, progress: bool = True
                  ) -> dict[int, torch.Tensor]:
    """Per layer, per head: ``E[m_h m_h^T]`` of the attention-mixed homogeneous inputs, (H, in + 1, in + 1).

    ``model`` must be a copy: its attention is switched to the eager implementation, which returns weights."""
    model.config._attn_implementation = "eager"
    sums: dict[int, torch.Tensor] = {}
    hooks = []
    for site in adapter.sites(model):
        def hook(_module, args, kwargs, output, layer=site.layer):
            states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            ones = torch.ones(*states.shape[:-1], 1, dtype=torch.float64, device=states.device)
            inputs = torch.cat([states.double(), ones], dim=-1)  # (B, L, in + 1)
            mixed = output[1].double() @ inputs[:, None]  # (B, H, L, in + 1)
            moment = torch.einsum("bhli,bhlj->hij", mixed, mixed)
            sums[layer] = moment if layer not in sums else sums[layer] + moment

        hooks.append(site.module.register_forward_hook(hook, with_kwargs=True))
    feed(model, adapter, batches, hooks, "attention-mixed calibration", progress)
    return {layer: total / batches.numel() for layer, total in sums.items()}
