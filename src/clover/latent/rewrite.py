"""From a layer's plan (which components, which ranks) to weights: the runtime's, and the same function written
as plain k/v projections (what the split search evaluates, and what the runtime is verified against).

Shared components: component j of frequency f is ``c_j = sum_g E[j, g] z_g`` (cached after RoPE) and stands in
for ``z_g ~= sum_j D[g, j] c_j``. A query head of KV group g scores ``Re(z_q conj(z_g))``, which becomes
``sum_j Re((conj(D[g, j]) z_q) conj(c_j))``: the query's projection onto component j is ``conj(D[g, j]) z_q``,
a complex-linear map of the head's own channel, so it folds into ``q_rope``. Whatever the components miss is the
key *residual*, which a pre-RoPE latent approximates (``mix``) or which is dropped (``shared``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .analysis import LayerAnalysis
from ..lowrank import complex_channels, real_channels, refit_readout, weighted_lowrank


@dataclass
class LayerPlan:
    layer: int
    components: list[tuple[int, int]]  # (frequency, component index) shared across KV heads
    k_rank: int  # pre-RoPE key latent
    v_rank: int

    @property
    def cached(self) -> int:
        return 2 * len(self.components) + self.k_rank + self.v_rank


@dataclass
class LayerWeights:
    """Homogeneous maps (in + 1, out) of one converted layer, in float64."""

    freqs: list[int]
    q_rope: torch.Tensor | None  # (in + 1, H * 2M)
    k_rope: torch.Tensor | None  # (in + 1, 2M)
    k_down: torch.Tensor | None  # (in + 1, k_rank)
    k_up: torch.Tensor | None  # (k_rank, G * d)
    v_down: torch.Tensor  # (in + 1, v_rank)
    o: torch.Tensor  # (D, H * v_rank): o_proj with each head's value up-projection folded in
    k_effective: torch.Tensor  # (in + 1, G * d): the keys the cached numbers stand for, before RoPE
    v_effective: torch.Tensor  # (in + 1, G * d)
    o_refit: torch.Tensor | None = None  # like ``o``, each head's block refit to its attention-mixed inputs


def _components(an: LayerAnalysis, chosen: list[tuple[int, int]]):
    """Encoding rows (in + 1, M) complex, decoding coefficients (M, G) and the keys they rebuild (in + 1, G*d)."""
    keys = complex_channels(an.k, an.kv_heads, an.head_dim)  # (in + 1, G, half)
    rebuilt = torch.zeros_like(keys)
    enc, dec = [], []
    for f, j in chosen:
        e = keys[:, :, f] @ an.rotary.encode[f, j]  # (in + 1,)
        d = an.rotary.decode[f, :, j]  # (G,)
        rebuilt[:, :, f] += e[:, None] * d[None, :]
        enc.append(e)
        dec.append(d)
    return enc, dec, real_channels(rebuilt)


def realize(an: LayerAnalysis, plan: LayerPlan, refit: bool = False) -> LayerWeights:
    H, G, d, r = an.heads, an.kv_heads, an.head_dim, an.group
    chosen = sorted(plan.components)
    freqs = [f for f, _ in chosen]
    q_rope = k_rope = None
    k_effective = torch.zeros_like(an.k)
    if chosen:
        enc, dec, k_effective = _components(an, chosen)
        enc_m = torch.stack(enc, dim=1)  # (in + 1, M)
        k_rope = torch.cat([enc_m.real, enc_m.imag], dim=1)
        queries = complex_channels(an.q, H, d)  # (in + 1, H, half)
        per_head = []
        for h in range(H):
            coeff = torch.stack([dec[m][h // r].conj() for m in range(len(chosen))])  # (M,)
            z = queries[:, h, freqs] * coeff  # (in + 1, M)
            per_head.append(torch.cat([z.real, z.imag], dim=1))
        q_rope = torch.cat(per_head, dim=1)
    k_down = k_up = None
    if plan.k_rank:
        if chosen:  # the residual the components miss, approximated before RoPE
            residual = weighted_lowrank(an.k - k_effective, an.chol, an.k_root, an.k_root_inv)
        else:
            residual = an.k_latent
        k_down, k_up = residual.truncate(plan.k_rank)
        k_effective = k_effective + k_down @ k_up
    v_down, v_up = an.v_latent.truncate(plan.v_rank)
    o_blocks = an.o.reshape(an.o.shape[0], H, d)
    up = v_up.reshape(plan.v_rank, G, d)
    o = torch.cat([o_blocks[:, h] @ up[:, h // r].mT for h in range(H)], dim=1)
    o_refit = refit_o(an, v_down) if refit and an.mixed is not None else None
    return LayerWeights(freqs, q_rope, k_rope, k_down, k_up, v_down, o, k_effective, v_down @ v_up, o_refit)


def refit_o(an: LayerAnalysis, v_down: torch.Tensor) -> torch.Tensor:
    """Per head, the O block that best maps the head's mixed latent ``m_h v_down`` to what the head wrote before,
    ``m_h W_V,g W_O,h`` (least squares on the attention-mixed moment ``C_h``): the latent is fixed, only its
    read-out into the residual stream adapts to what attention really averages."""
    H, d, r = an.heads, an.head_dim, an.group
    blocks = []
    for h in range(H):
        blocks.append(refit_readout(v_down, an.mixed[h], an.v[:, (h // r) * d:(h // r + 1) * d],
                                    an.o[:, h * d:(h + 1) * d]))
    return torch.cat(blocks, dim=1)
