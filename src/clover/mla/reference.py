"""clover's own reference of a converted model: the MLA function as plain math inside the original model.

Each attention block of a copy of the original LLaMA-family model is replaced by ``ReferenceAttention``, which
computes the converted attention straight from the solved maps (``solve.LayerMla``): the shared rotated key and
the per-head rotated queries through the model's own rotary embedding, the joint latent without any norm, the
original softmax scale. The stock DeepSeek-V3 checkpoint must reproduce this function (``convert`` checks it on
every conversion, the tests in a process without clover); the original model is the quality reference.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .solve import LayerMla


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Pairs (2j, 2j+1) turned by the original frequency ``freqs[j]``; ``cos``/``sin`` in HF's rotate-half form
    (B, T, d), of which the first half holds one angle per frequency."""
    half = cos.shape[-1] // 2
    freqs = freqs.to(cos.device)
    cos, sin = cos[..., :half][..., freqs], sin[..., :half][..., freqs]
    if x.dim() == 4:  # (B, H, T, d)
        cos, sin = cos[:, None], sin[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def mla_attention(x: torch.Tensor, maps: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                  freqs: torch.Tensor, group: int, scaling: float) -> torch.Tensor:
    """The converted attention of ``x`` (B, T, D), causal, up to and including O: the shared rotated key and the
    per-head rotated queries turned by the original frequencies ``freqs``, the joint latent without any norm, the
    original softmax scale. ``maps`` holds ``solve.LayerMla``'s tensors by name; differentiable in them (the
    layer-wise refit, ``local.py``, trains through it)."""
    q_rope = rotate_interleaved(torch.einsum("btd,hde->bhte", x, maps["q_rope"]), cos, sin, freqs)
    k_rope = rotate_interleaved(x @ maps["k_rope"], cos, sin, freqs)  # (B, T, d): one key for every head
    q_nope = torch.einsum("btd,hde->bhte", x, maps["q_nope"])
    z = x @ maps["down"]  # the joint latent: what the cache holds besides the rotated key
    k_nope = z @ maps["up_k"]
    v = torch.einsum("btr,grd->bgtd", z, maps["up_v"]).repeat_interleave(group, dim=1)
    scores = (q_nope @ k_nope.transpose(1, 2)[:, None] + q_rope @ k_rope.transpose(1, 2)[:, None]) * scaling
    t = x.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    attn = F.softmax(scores.float(), dim=-1).to(x.dtype)
    out = (attn @ v).transpose(1, 2).reshape(x.shape[0], t, -1)
    return out @ maps["o"].T


MAPS = ("q_nope", "q_rope", "k_rope", "down", "up_k", "up_v", "o")  # the trained / buffered tensors of a LayerMla


class ReferenceAttention(nn.Module):
    def __init__(self, layer: LayerMla, scaling: float, dtype: torch.dtype):
        super().__init__()
        for name in MAPS:
            self.register_buffer(name, getattr(layer, name).to(dtype), persistent=False)
        self.scaling = scaling
        self.group = layer.group
        self.freqs = layer.rope_freqs

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        cos, sin = position_embeddings
        maps = {name: getattr(self, name) for name in MAPS}
        return mla_attention(hidden_states, maps, cos, sin, self.freqs, self.group, self.scaling), None


def reference_model(model: nn.Module, layers: list[LayerMla], head_dim: int, dtype: torch.dtype | None = None,
                    mlp_down: list[torch.Tensor | None] | None = None) -> nn.Module:
    """A copy of ``model`` whose attention blocks compute the converted function (full forwards only, no cache), in
    the model's dtype or ``dtype`` (float64: the converted function without rounding, from the float64 solve);
    ``mlp_down``: per layer, the MLP down projection the stream refit (``stream.py``) gave it, None where it kept
    the original's (a refit O projection is in ``layers``)."""
    dtype = dtype or next(model.parameters()).dtype
    twin = copy.deepcopy(model).to(dtype).eval()
    for i, (block, layer) in enumerate(zip(twin.model.layers, layers, strict=True)):
        block.self_attn = ReferenceAttention(layer, head_dim**-0.5, dtype)
        if mlp_down is not None and mlp_down[i] is not None:
            with torch.no_grad():
                block.mlp.down_proj.weight.copy_(mlp_down[i].to(dtype))
    return twin
