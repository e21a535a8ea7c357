"""What the original model's attention does on calibration text, per layer: the statistics the rotary levers need.

The MLA format keeps one rotated key per frequency; the other key components attend without rotation. Three
levers read the original attention to decide what that costs and how to make up for it (``rotation.py``):

- ``received``: how much attention each KV group's keys receive at each position (a key that is read matters);
  the ``attention`` rope-key choice weights the key moment by it, so the shared rotated component is the one whose
  loss would move the most attention mass.
- ``phase``: per head and frequency, the attention-weighted mean of ``exp(i theta (m - n))`` over query m and key
  n, one complex number: the rotation's expectation under the original attention, which the ``expected`` lever
  folds into the unrotated queries.
- ``inputs``: a few windows of attention inputs, kept for the least-squares ``refit`` of the unrotated pairs to the
  original scores once the components are known.
- ``mixed``: per head, the second moment of the attention-mixed inputs ``P_h x`` (what a value error really
  reaches the output through), for the O refit of the joint latent's values (as ``latent`` refits O).

Everything is computed in float64 from the attention input (the q projection's input) of each layer, positions
0..T-1 of each window, through the original q/k maps and rotary frequencies; no model code is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..lowrank import complex_channels


@dataclass
class LayerAttention:
    phase: torch.Tensor  # (H, F) complex: attention-weighted mean of exp(i theta_f (m - n)) per head
    key_moment: torch.Tensor  # (F, G, G) complex: E[sqrt(r_g r_g') z_g conj(z_g')], r = attention received
    inputs: list[torch.Tensor] = field(default_factory=list)  # (T, D) float64 windows kept for the refit
    queries: int = 0  # query positions summed into phase
    mixed: torch.Tensor | None = None  # (H, D, D): E[(P_h x)(P_h x)^T], the attention-mixed inputs (O refit)


def phases(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``exp(i theta_f p)`` for every position (or distance) p: shape ``positions.shape + (F,)``, complex."""
    angles = positions[..., None] * inv_freq.to(positions.dtype)
    return torch.polar(torch.ones_like(angles), angles)


def original_attention(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, heads: int, kv_heads: int,
                       head_dim: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """(H, T, T) causal attention probabilities of one window ``x`` (T, D) under the original q/k maps (D, H d) /
    (D, G d) and RoPE with frequencies ``inv_freq`` (d / 2,), softmax scale 1 / sqrt(d)."""
    t = x.shape[0]
    qz = complex_channels(x @ q, heads, head_dim)  # (T, H, F)
    kz = complex_channels(x @ k, kv_heads, head_dim)
    turn = phases(torch.arange(t, dtype=x.dtype), inv_freq)  # (T, F)
    qz, kz = qz * turn[:, None], kz * turn[:, None]
    kz = kz.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("mhf,nhf->hmn", qz, kz.conj()).real * head_dim**-0.5
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def distance_phase(attn: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """(H, F) complex: sum over queries m and keys n of ``attn[h, m, n] exp(i theta_f (m - n))``."""
    heads, t, _ = attn.shape
    distance = (torch.arange(t)[:, None] - torch.arange(t)[None]).clamp_min(0)  # causal: m >= n
    by_distance = attn.new_zeros(heads, t).scatter_add_(1, distance.flatten()[None].expand(heads, -1),
                                                        attn.reshape(heads, -1))  # attention mass per distance
    turn = phases(torch.arange(t, dtype=attn.dtype), inv_freq)  # (distance, F)
    return by_distance.to(turn.dtype) @ turn


def collect(model: nn.Module, adapter, sites, batches: torch.Tensor, inv_freq: torch.Tensor, keep: int,
            progress: bool = True, mixed: bool = False) -> list[LayerAttention]:
    """Per site, the statistics above over ``batches`` (n, seqlen) of token ids; the first ``keep`` windows'
    attention inputs are kept for the refit; ``mixed``: also the attention-mixed input moments."""
    stats: list[LayerAttention | None] = [None] * len(sites)
    weights = []
    for site in sites:
        w = adapter.read(site)
        weights.append((w.q.weight.detach().double().T, w.k.weight.detach().double().T, w.num_heads,
                        w.num_kv_heads, w.qk_dim))
    window = {"index": 0}

    def hook(i: int):
        def fn(module, args):
            q, k, heads, kv_heads, d = weights[i]
            for x in args[0].detach().double():  # (T, D) per sequence of the batch
                attn = original_attention(x, q, k, heads, kv_heads, d, inv_freq)
                received = attn.sum(1).reshape(kv_heads, heads // kv_heads, -1).mean(1)  # (G, T)
                kz = complex_channels(x @ k, kv_heads, d)  # (T, G, F)
                root = received.clamp_min(0).sqrt().T[:, :, None]  # (T, G, 1)
                weighted = kz * root
                moment = torch.einsum("tgf,thf->fgh", weighted, weighted.conj())
                phase = distance_phase(attn, inv_freq)
                if stats[i] is None:
                    stats[i] = LayerAttention(phase, moment)
                else:
                    stats[i].phase += phase
                    stats[i].key_moment += moment
                if mixed:
                    m = attn @ x  # (H, T, D)
                    moment_mixed = m.mT @ m
                    stats[i].mixed = moment_mixed if stats[i].mixed is None else stats[i].mixed + moment_mixed
                stats[i].queries += x.shape[0]
                if window["index"] < keep:
                    stats[i].inputs.append(x)
        return fn

    hooks = [adapter.projections(site)["q"].register_forward_pre_hook(hook(i)) for i, site in enumerate(sites)]
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for row in tqdm(batches, desc="attention statistics", unit="sample", disable=not progress):
                model(**adapter.calibration_inputs(model, row[None].to(device)))
                window["index"] += 1
    finally:
        for h in hooks:
            h.remove()
    for s in stats:
        s.phase /= s.queries
        s.key_moment /= s.queries
        if s.mixed is not None:
            s.mixed /= s.queries
    return stats
