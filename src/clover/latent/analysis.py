"""Per layer, everything the budget and the rewrite need, computed once from the weights and the input moment.

The only statistic is the second moment of the attention input (with the homogeneous 1), which calibration
gathers anyway: the query energy that weighs key errors follows from it analytically (``q = x~ W_q``), and the
cost of a value error is the Gram of the O blocks that read it (the cross-layer V-O pair, across heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate import cholesky_factor
from ..pairs import AttentionWeights, Projection
from ..lowrank import LowRank, RotaryComponents, channel_energy, complex_channels, rotary_components, sym_sqrt, \
    weighted_lowrank


def homogeneous(p: Projection, dtype: torch.dtype) -> torch.Tensor:
    """``nn.Linear`` (out, in) weight and bias -> (in + 1, out) map of homogeneous input rows."""
    bias = p.bias if p.bias is not None else torch.zeros(p.weight.shape[0], dtype=p.weight.dtype,
                                                         device=p.weight.device)
    return torch.cat([p.weight.mT, bias[None]], dim=0).to(dtype)


@dataclass
class LayerAnalysis:
    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    q: torch.Tensor  # (in + 1, H * d)
    k: torch.Tensor  # (in + 1, G * d)
    v: torch.Tensor  # (in + 1, G * d)
    o: torch.Tensor  # (D, H * d): o_proj weight
    o_bias: torch.Tensor | None
    cov: torch.Tensor  # (in + 1, in + 1)
    chol: torch.Tensor
    k_root: torch.Tensor  # output weights of key errors (diagonal: sqrt of the query energy per channel)
    k_root_inv: torch.Tensor
    v_root: torch.Tensor  # output weights of value errors (block diagonal: sqrt of each group's O Gram)
    v_root_inv: torch.Tensor
    key_weight: torch.Tensor  # (G, half): sqrt of the query energy each KV head's frequency serves
    k_latent: LowRank
    v_latent: LowRank
    rotary: RotaryComponents | None
    mixed: torch.Tensor | None = None  # (H, in + 1, in + 1): attention-mixed input moment per head (O refit)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def key_gains(self) -> torch.Tensor:
        return self.k_latent.s.square()

    def value_gains(self) -> torch.Tensor:
        return self.v_latent.s.square()

    def component_order(self) -> list[tuple[int, int]]:
        """Rotary components (frequency, index) strongest first."""
        energy = self.rotary.energy
        order = torch.argsort(energy.flatten(), descending=True, stable=True).tolist()
        return [divmod(i, energy.shape[1]) for i in order]


def analyse(layer: int, w: AttentionWeights, moment: torch.Tensor, head_dim: int, rotary: bool,
            dtype: torch.dtype = torch.float64, warn=None, mixed: torch.Tensor | None = None) -> LayerAnalysis:
    """``mixed`` (attention-mixed moments per head, ``mixing.mixed_moments``): values are then whitened by
    their mean over heads instead of by the plain input moment, and kept for the per-head O refit."""
    heads, kv_heads = w.num_heads, w.num_kv_heads
    q, k, v = (homogeneous(p, dtype) for p in (w.q, w.k, w.v))
    cov = moment.to(dtype)
    chol = cholesky_factor(cov, name=f"layer {layer} attention input", warn=warn)
    group = heads // kv_heads
    energy = channel_energy(q, cov, heads, head_dim).reshape(kv_heads, group, -1).sum(1)  # (G, half)
    key_weight = energy.clamp_min(1e-12 * energy.max().clamp_min(1e-300)).sqrt()
    if rotary:  # rotate-half: channels f and f + d/2 turn into each other, so they share one weight
        per_channel = torch.cat([key_weight, key_weight], dim=1).reshape(-1)
    else:  # each key channel meets one query channel (per head of its group)
        squares = ((cov @ q) * q).sum(0).reshape(kv_heads, group, head_dim).sum(1).reshape(-1)
        per_channel = squares.clamp_min(1e-12 * squares.max().clamp_min(1e-300)).sqrt()
    k_root, k_root_inv = torch.diag(per_channel), torch.diag(1 / per_channel)
    o = w.o.weight.to(dtype)
    blocks = o.reshape(o.shape[0], kv_heads, group, head_dim)
    roots = [sym_sqrt(torch.einsum("dhi,dhj->ij", blocks[:, g], blocks[:, g])) for g in range(kv_heads)]
    v_root = torch.block_diag(*(r for r, _ in roots))
    v_root_inv = torch.block_diag(*(r for _, r in roots))
    v_chol = chol
    if mixed is not None:
        mixed = mixed.to(dtype)
        v_chol = cholesky_factor(mixed.mean(0), name=f"layer {layer} attention-mixed input", warn=warn)
    rot = None
    if rotary:
        rot = rotary_components(complex_channels(k, kv_heads, head_dim), cov, key_weight)
    return LayerAnalysis(
        layer, heads, kv_heads, head_dim, q, k, v, o, None if w.o.bias is None else w.o.bias.to(dtype), cov, chol,
        k_root, k_root_inv, v_root, v_root_inv, key_weight,
        weighted_lowrank(k, chol, k_root, k_root_inv), weighted_lowrank(v, v_chol, v_root, v_root_inv), rot, mixed)
