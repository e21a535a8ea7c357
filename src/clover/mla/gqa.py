"""The second engine layout: fewer KV heads in the plain ``llama`` architecture, which every engine runs.

Each new KV head serves a cluster of the original KV groups (``G / n`` of them, in order). Its key is the strongest
rotary component of each frequency over the cluster's channels (the query-weighted PCA the MLA layout shares, so it
turns with RoPE exactly, in the rotate-half layout transformers uses); the other components have no place at all
here (MLA keeps them unrotated in its latent), so they are dropped. Its value is a whitened rank-``d`` latent of
the cluster's values, each original head's up-projection folded into its block of ``o_proj``; the query rows take
the key mix. Head width, softmax scale and everything outside attention stay as they were.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..lowrank import complex_channels, real_channels, rotary_components, weighted_lowrank
from ..rebuild import copy_matching
from .solve import key_weight, value_root


def gqa_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, cov: torch.Tensor,
              chol: torch.Tensor, heads: int, kv_heads: int, head_dim: int, new_kv: int) -> dict[str, torch.Tensor]:
    """nn.Linear weights (out, in) of the layer with ``new_kv`` KV heads, plus the shares of the key energy in the
    kept rotary components (``rope_energy``) and of the value energy in the kept latent (``latent_energy``)."""
    group, per = heads // kv_heads, kv_heads // new_kv
    qz = complex_channels(q, heads, head_dim)
    kz = complex_channels(k, kv_heads, head_dim)
    weight = key_weight(q, cov, heads, kv_heads, head_dim)
    new_q = torch.zeros_like(qz)
    new_k = kz.new_zeros(kz.shape[0], new_kv, kz.shape[2])
    v_cols, o_blocks, kept, total, v_kept, v_total = [], [None] * heads, 0.0, 0.0, 0.0, 0.0
    for c in range(new_kv):
        groups = list(range(c * per, (c + 1) * per))
        comps = rotary_components(kz[:, groups], cov, weight[groups])
        kept, total = kept + float(comps.energy[:, 0].sum()), total + float(comps.energy.sum())
        new_k[:, c] = torch.einsum("fg,ngf->nf", comps.encode[:, 0], kz[:, groups])
        cols = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups])
        root = value_root(o, kv_heads, group, head_dim, groups)
        lowrank = weighted_lowrank(v[:, cols], chol, root, torch.linalg.pinv(root, hermitian=True))
        down, up = lowrank.truncate(head_dim)
        energy_v = lowrank.s.square()
        v_kept, v_total = v_kept + float(energy_v[:head_dim].sum()), v_total + float(energy_v.sum())
        v_cols.append(down)
        for local, g in enumerate(groups):
            for a in range(group):
                h = g * group + a
                new_q[:, h] = qz[:, h] * comps.decode[:, local, 0].conj()
                o_blocks[h] = o[:, h * head_dim:(h + 1) * head_dim] @ up[:, local * head_dim:(local + 1) * head_dim].T
    return {"q_proj": real_channels(new_q).T, "k_proj": real_channels(new_k).T, "v_proj": torch.cat(v_cols, dim=1).T,
            "o_proj": torch.cat(o_blocks, dim=1), "rope_energy": kept / max(total, 1e-300),
            "latent_energy": v_kept / max(v_total, 1e-300)}


def build(model: nn.Module, layers: list[dict[str, torch.Tensor]], new_kv: int) -> nn.Module:
    """A stock model of ``model``'s own class with ``new_kv`` KV heads holding ``layers``."""
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = new_kv
    if hasattr(config, "quantization_config"):  # a model dequantized from a GGUF: the rewrite is plain weights
        del config.quantization_config
    reference = next(model.parameters())
    rewritten = type(model)(config).to(device=reference.device, dtype=reference.dtype).eval()
    copy_matching(rewritten, model.state_dict())
    with torch.no_grad():
        for block, layer in zip(rewritten.model.layers, layers, strict=True):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(block.self_attn, name).weight.copy_(layer[name])
    return rewritten
