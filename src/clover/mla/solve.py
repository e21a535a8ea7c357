"""The math of one layer's MLA conversion, with no model knowledge (float64, no biases).

A LLaMA-family layer has H query heads in G KV groups of head width d under RoPE (rotate-half layout). Per
frequency f, RoPE multiplies every key's complex channel ``z_g,f = k_g[f] + i k_g[f + d/2]`` by the same phase,
so any complex mix of the G channels commutes with it. A query-weighted PCA of the G channels per frequency
(``lowrank.rotary_components``) gives G components ``c_j,f``; head h of group g scores

    Re(q~_h,f conj(z_g,f) e^{i theta (m - n)}) = sum_j Re(p_h,j,f conj(c_j,f) e^{i theta (m - n)}),
    p_h,j,f = q~_h,f conj(decode[f, g, j]).

The MLA format has one rotated key shared by all heads: component 0 of every frequency is that key (exact under
RoPE). Components 1..G-1 have no rotated place: they lose the rotation (the only error at full rank) and join the
values in one joint latent ``z`` (whitened by the attention inputs, key rows weighted by the query energy that
reads them, value rows by the O blocks that read them, ``split`` trading one against the other), decoded per head
by ``kv_b``. Ranks: ``qk_nope_head_dim = (G - 1) d`` (every head reads every unrotated component), full latent
``(G - 1) d + G d``; the cache holds ``kv_lora_rank + d`` numbers per token against ``2 G d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lowrank import channel_energy, complex_channels, rotary_components, sym_sqrt, weighted_lowrank


@dataclass
class LayerMla:
    """One layer in MLA form; every map acts on the attention input x (rows: ``y = x @ map``).

    q_nope: (H, D, n_nope), q_rope: (H, D, d) interleaved pairs; k_rope: (D, d) interleaved; down: (D, r) the
    latent; up_k: (r, n_nope) shared by all heads; up_v: (G, r, d); o: (D_out, H d) unchanged.
    """

    q_nope: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    down: torch.Tensor
    up_k: torch.Tensor
    up_v: torch.Tensor
    o: torch.Tensor
    kept_energy: float  # share of the joint latent's weighted energy kept at this rank
    rope_energy: float  # share of the key energy (query-weighted) in the shared rotated component

    @property
    def group(self) -> int:
        return self.q_nope.shape[0] // self.up_v.shape[0]


@dataclass
class LayerParts:
    """Everything but the rank: the rotary split and the joint latent's full decomposition."""

    q_nope: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    target: torch.Tensor  # (D, n_nope + G d): the unrotated key components, then every group's values
    chol: torch.Tensor
    key_root: torch.Tensor  # (n_nope, n_nope) sqrt of the query energy reading each unrotated component
    value_root: torch.Tensor  # (G d, G d) block diagonal: sqrt of each group's O Gram
    o: torch.Tensor
    rope_energy: float


def interleave(z: torch.Tensor) -> torch.Tensor:
    """(..., F) complex -> (..., 2F) real as (re_0, im_0, re_1, im_1, ...): the engines' rope layout."""
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def unrotated(z: torch.Tensor) -> torch.Tensor:
    """(..., J, F) complex -> (..., J * 2F) real; ``Re(p conj(c))`` becomes a plain dot product."""
    return torch.cat([z.real, z.imag], dim=-1).flatten(-2)


def key_weight(q: torch.Tensor, cov: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """(G, F): sqrt of the query energy each KV head's frequency serves (the rotary PCA's weights)."""
    energy = channel_energy(q, cov, heads, head_dim).reshape(kv_heads, heads // kv_heads, -1).sum(1)
    return energy.clamp_min(1e-12 * energy.max().clamp_min(1e-300)).sqrt()


def value_root(o: torch.Tensor, kv_heads: int, group: int, head_dim: int, groups: list[int]) -> torch.Tensor:
    """Block diagonal over ``groups``: sqrt of each group's O Gram (sum over its heads of W_o^T W_o), the cost of a
    value error."""
    blocks = o.reshape(o.shape[0], kv_heads, group, head_dim)[:, groups]
    gram = torch.einsum("ogad,ogae->gde", blocks, blocks)
    return torch.block_diag(*(sym_sqrt(g)[0] for g in gram))


def split_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, cov: torch.Tensor,
                heads: int, kv_heads: int, head_dim: int, chol: torch.Tensor) -> LayerParts:
    """``q``/``k``/``v``: (D, H d) / (D, G d) / (D, G d) maps; ``o``: (D_out, H d); ``cov``: input second moment."""
    group = heads // kv_heads
    qz = complex_channels(q, heads, head_dim)  # (D, H, F)
    kz = complex_channels(k, kv_heads, head_dim)  # (D, G, F)
    comps = rotary_components(kz, cov, key_weight(q, cov, heads, kv_heads, head_dim))
    c = torch.einsum("fjg,ngf->njf", comps.encode, kz)  # (D, G comps, F)
    owner = torch.arange(heads) // group
    p = qz[:, :, None, :] * comps.decode.conj()[:, owner, :].permute(1, 2, 0)[None]  # (D, H, G comps, F)
    q_rope = interleave(p[:, :, 0]).permute(1, 0, 2)  # (H, D, d)
    q_nope = unrotated(p[:, :, 1:]).permute(1, 0, 2)  # (H, D, (G-1) d)
    k_rope = interleave(c[:, 0])  # (D, d)
    k_nope = unrotated(c[:, 1:])  # (D, (G-1) d)
    key_gram = torch.einsum("hni,nm,hmj->ij", q_nope, cov, q_nope)
    key_root = sym_sqrt(key_gram)[0] if key_gram.numel() else key_gram
    values = value_root(o, kv_heads, group, head_dim, list(range(kv_heads)))
    total = comps.energy.sum().clamp_min(1e-300)
    return LayerParts(q_nope, q_rope, k_rope, torch.cat([k_nope, v], dim=1), chol, key_root, values, o,
                      float(comps.energy[:, 0].sum() / total))


def latent_layer(parts: LayerParts, rank: int, split: float) -> LayerMla:
    """The joint latent of ``rank`` dims with key rows weighted ``split`` times more than value rows."""
    n_nope = parts.q_nope.shape[-1]
    root = torch.block_diag(parts.key_root * split**0.5, parts.value_root) if n_nope else parts.value_root
    root_inv = torch.linalg.pinv(root, hermitian=True)
    lowrank = weighted_lowrank(parts.target, parts.chol, root, root_inv)
    down, up = lowrank.truncate(rank)
    if down.shape[1] < rank:  # more latent dims asked than the layer has: zero dims keep the function exact
        pad = rank - down.shape[1]
        down = torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1)
        up = torch.cat([up, up.new_zeros(pad, up.shape[1])], dim=0)
    energy = lowrank.s.square()
    kept = float(energy[:rank].sum() / energy.sum().clamp_min(1e-300))
    kv_heads = (parts.target.shape[1] - n_nope) // parts.q_rope.shape[-1]
    up_v = up[:, n_nope:].reshape(rank, kv_heads, -1).permute(1, 0, 2)
    return LayerMla(parts.q_nope, parts.q_rope, parts.k_rope, down, up[:, :n_nope], up_v, parts.o, kept,
                    parts.rope_energy)


def full_rank(kv_heads: int, head_dim: int) -> int:
    """Latent dims that hold a layer exactly (up to the lost rotation): unrotated key components and values."""
    return (kv_heads - 1) * head_dim + kv_heads * head_dim
