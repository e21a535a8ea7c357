"""From one attention block's projections to the cross-layer pairs CLOVER decomposes, and back.

Adapters hand us Q, K, V, O in ``nn.Linear`` orientation (weight is ``out x in``, heads contiguous on the head
axis); everything here is layout-free. Per KV group g with r = heads / kv_heads query heads:

- Q-K: the score of head h is ``[x,1] A_h^T B_g [y,1]^T`` with ``A_h = [W_q^h | b_q^h]`` and
  ``B_g = [W_k^g | b_k^g]``. Stacking the group's ``A_h^T`` gives ``left`` (r*(D+1), d), ``right = B_g^T``.
- V-O: head h contributes ``O^h (attn @ (V_g [y,1]))``; attention rows sum to one, so V's bias rides along as a
  homogeneous column. Stacking the group's ``O^h`` gives ``left`` (r*D_out, d), ``right = [W_v^g | b_v^g]^T``.

A bias column is only added where the projection has a bias. Any invertible change of basis T of the group's
shared K (or V) head, compensated by T^-T on its Q heads (or T^-1 on its O blocks), is exact, which is why one
SVD per group keeps GQA exact.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from .decompose import decompose

PairKind = Literal["qk", "vo"]


@dataclass
class Projection:
    """A linear map in ``nn.Linear`` orientation: ``y = x @ weight.T + bias``."""

    weight: torch.Tensor  # (out_features, in_features)
    bias: torch.Tensor | None = None


def check_finite(weights: "AttentionWeights", site) -> None:
    """NaN or inf in a projection would surface as an opaque LinAlgError inside an SVD: name the layer instead."""
    from .errors import CloverError

    for name in ("q", "k", "v", "o"):
        p = getattr(weights, name)
        for tensor in (p.weight, p.bias):
            if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                stack = f"{site.stack} " if getattr(site, "stack", "") else ""
                raise CloverError(f"non-finite weights in {stack}layer {site.layer} ({site.name}, {name} projection): "
                                  "the checkpoint holds NaN or inf; re-export or repair it before using clover")


@dataclass
class AttentionWeights:
    """One attention block's projections, in the layout every family reduces to."""

    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qk_dim(self) -> int:
        return self.k.weight.shape[0] // self.num_kv_heads

    @property
    def vo_dim(self) -> int:
        return self.v.weight.shape[0] // self.num_kv_heads


def _homogeneous(p: Projection, heads: int) -> torch.Tensor:
    """``[W | b]`` per head, transposed: (heads, in (+1), head_dim)."""
    w = p.weight if p.bias is None else torch.cat([p.weight, p.bias[:, None]], dim=1)
    return w.reshape(heads, -1, w.shape[1]).mT


def _split_homogeneous(factor: torch.Tensor, has_bias: bool) -> Projection:
    """Inverse of ``_homogeneous``: (heads, in (+1), d) -> Projection with out = heads * d."""
    w = factor.mT.reshape(-1, factor.shape[-2])
    return Projection(w[:, :-1], w[:, -1]) if has_bias else Projection(w, None)


def qk_factors(w: AttentionWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) of the Q-K pair per KV group: (G, r*(D_q+1), d), (G, D_k+1, d)."""
    q = _homogeneous(w.q, w.num_heads)  # (H, D+1, d)
    left = q.reshape(w.num_kv_heads, w.group_size * q.shape[1], q.shape[2])
    return left, _homogeneous(w.k, w.num_kv_heads)


def vo_factors(w: AttentionWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) of the V-O pair per KV group: (G, r*D_out, d), (G, D_v+1, d)."""
    d_out = w.o.weight.shape[0]
    o = w.o.weight.reshape(d_out, w.num_heads, w.vo_dim).permute(1, 0, 2)  # (H, D_out, d)
    left = o.reshape(w.num_kv_heads, w.group_size * d_out, w.vo_dim)
    return left, _homogeneous(w.v, w.num_kv_heads)


def factors(w: AttentionWeights, kind: PairKind) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_factors(w) if kind == "qk" else vo_factors(w)


def pair_width(w: AttentionWeights, kind: PairKind) -> int:
    """The most directions the pair's product can have: its head dim, unless a side has fewer rows (an MLA value
    read from a 32-dim latent has at most 32 directions, whatever ``v_head_dim`` is). From shapes alone."""
    if kind == "qk":
        left = w.group_size * (w.q.weight.shape[1] + (w.q.bias is not None))
        return min(w.qk_dim, left, w.k.weight.shape[1] + (w.k.bias is not None))
    return min(w.vo_dim, w.group_size * w.o.weight.shape[0], w.v.weight.shape[1] + (w.v.bias is not None))


def with_factors(w: AttentionWeights, kind: PairKind, left: torch.Tensor, right: torch.Tensor) -> AttentionWeights:
    """New weights with the pair replaced; the head dim becomes ``left.shape[-1]`` (smaller when pruned)."""
    d = left.shape[-1]
    if kind == "qk":
        q_heads = left.reshape(w.num_heads, -1, d)  # (H, D+1, d)
        q = _split_homogeneous(q_heads, w.q.bias is not None)
        k = _split_homogeneous(right, w.k.bias is not None)
        return replace(w, q=q, k=k)
    d_out = w.o.weight.shape[0]
    o_heads = left.reshape(w.num_heads, d_out, d)  # (H, D_out, d)
    o = Projection(o_heads.permute(1, 0, 2).reshape(d_out, w.num_heads * d), w.o.bias)
    v = _split_homogeneous(right, w.v.bias is not None)
    return replace(w, o=o, v=v)


def balanced(w: AttentionWeights, kind: PairKind, compute_dtype: torch.dtype = torch.float64
             ) -> tuple[AttentionWeights, torch.Tensor]:
    """The pair in CLOVER's form (``U sqrt(S)`` on one side, ``V sqrt(S)`` on the other) and its singular values:
    the same product, so the same function, with each side holding an even share of the scale."""
    left, right = factors(w, kind)
    out = decompose(left, right, compute_dtype=compute_dtype)
    return with_factors(w, kind, out.left, out.right), out.s


def cast_like(new: AttentionWeights, ref: AttentionWeights) -> AttentionWeights:
    """Cast every tensor of ``new`` to the dtype/device of the matching tensor in ``ref``."""

    def cast(p: Projection, r: Projection) -> Projection:
        bias = None if p.bias is None else p.bias.to(device=r.bias.device, dtype=r.bias.dtype)
        return Projection(p.weight.to(device=r.weight.device, dtype=r.weight.dtype).contiguous(), bias)

    return replace(new, q=cast(new.q, ref.q), k=cast(new.k, ref.k), v=cast(new.v, ref.v), o=cast(new.o, ref.o))
