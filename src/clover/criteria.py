"""How each criterion ranks a pair's head dimensions, as a ``Candidate``: factors plus one score per unit.

- ``vanilla``: the original dims, ranked by the norm product of the two factors' columns (the paper's baseline).
- ``clover``: the CLOVER basis (SVD of the product); score is the squared singular value, i.e. what removing the
  direction adds to the squared Frobenius error of the product.
- ``whitened``: the SVD of the product seen through the calibration inputs' covariance (``L^T`` on each input
  side); score is the squared whitened singular value, i.e. the expected squared output error on that data.
- ``rotary-weight`` / ``rotary-activation``: for Q-K under rotary embeddings, where no basis change is exact, whole
  frequency pairs (channels i and i + d/2 of q and k, every head of the KV group together) are kept or dropped,
  scored by weight norms or by the mean squared q and k activations.

Scores are output errors in each layer's own units; the global allocation compares each unit's share of its
layer's total (``ranks.global_keeps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibrate import SiteStats, cholesky_factor
from .decompose import decompose
from .errors import CloverError
from .pairs import AttentionWeights, PairKind, factors

PAIR_CRITERIA = ("vanilla", "clover", "whitened")
ROTARY_CRITERIA = ("rotary-weight", "rotary-activation")
CRITERIA = PAIR_CRITERIA + ROTARY_CRITERIA
DATA_AWARE = ("whitened", "rotary-activation")


@dataclass
class Candidate:
    """A pair's factors, ordered so that keeping units ``0..k-1`` of every group is the criterion's choice.

    ``left``/``right`` are (G, m, d) / (G, n, d). A unit is one column, or for rotary pairs two columns
    (``position`` and ``position + d/2``); ``order`` (G, units) lists unit positions best first and ``scores``
    (G, units) their scores in that order.
    """

    kind: PairKind
    criterion: str
    left: torch.Tensor
    right: torch.Tensor
    scores: torch.Tensor
    order: torch.Tensor | None = None  # rotary only: positions of frequency pairs, best first
    head_moments: torch.Tensor | None = None  # mixed V-O only: (G, r, d, d) second moments of each head's values
    head_o: torch.Tensor | None = None  # mixed V-O only: (G, r, D_out, d) original O blocks
    projection: torch.Tensor | None = None  # mixed V-O only: (G, d, d) maps a value to the sorted directions

    @property
    def unit_size(self) -> int:
        return 2 if self.order is not None else 1

    @property
    def units(self) -> int:
        return self.scores.shape[-1]

    def columns(self, keep: int) -> torch.Tensor:
        """(G, keep * unit_size) column indices that survive when ``keep`` units are kept per group."""
        groups = self.left.shape[0]
        if self.order is None:
            return torch.arange(keep).expand(groups, keep)
        kept = self.order[:, :keep].sort(dim=-1).values
        return torch.cat([kept, kept + self.units], dim=-1)

    def truncate(self, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.columns(keep)
        gather = lambda f: torch.gather(f, 2, idx[:, None, :].expand(-1, f.shape[1], -1))  # noqa: E731
        left, right = gather(self.left), gather(self.right)
        if self.head_moments is not None and keep < self.units:
            left = self._refit_heads(keep)
        return left, right

    def _refit_heads(self, keep: int) -> torch.Tensor:
        """Least-squares O per head given the group's shared kept directions (pooled SVD chose them).

        With ``u' = P_k u`` the kept values, ``O_h' = O_h C_h P_k^T (P_k C_h P_k^T)^-1`` minimises
        ``E||O_h u - O_h' u'||^2`` for head h's own value statistics C_h: never worse than the pooled fit.
        """
        proj = self.projection[:, :keep, :]  # (G, k, d)
        c = self.head_moments  # (G, r, d, d)
        cross = c @ proj.unsqueeze(1).mT  # (G, r, d, k)
        gram = proj.unsqueeze(1) @ cross  # (G, r, k, k)
        eye = torch.eye(keep, dtype=gram.dtype)
        gram = gram + 1e-9 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye
        fitted = torch.linalg.solve(gram, (self.head_o @ cross).mT).mT  # (G, r, D_out, k)
        return fitted.reshape(fitted.shape[0], -1, keep)



def _sorted_candidate(kind, criterion, left, right, scores) -> Candidate:
    """Reorder columns of both factors per group by descending score."""
    order = scores.argsort(dim=-1, descending=True)
    take = lambda f: torch.gather(f, 2, order[:, None, :].expand(-1, f.shape[1], -1))  # noqa: E731
    return Candidate(kind, criterion, take(left), take(right), torch.gather(scores, 1, order))


def _input_moment(moment: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """The statistics carry a homogeneous 1; a projection without bias has no such column in its factor."""
    return moment if has_bias else moment[:-1, :-1]


def _whitening(w: AttentionWeights, stats: SiteStats, kind: PairKind, name: str,
               warn) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Cholesky factors of each input side's second moment (Q-K: both sides; V-O: the V side only)."""
    kv_proj = w.k if kind == "qk" else w.v
    kv = cholesky_factor(_input_moment(stats.kv_input, kv_proj.bias is not None), name=f"{name} K/V input", warn=warn)
    if kind == "qk":
        q = cholesky_factor(_input_moment(stats.q_input, w.q.bias is not None), name=f"{name} Q input", warn=warn)
        return q, kv
    return None, kv


def _mixed_vo_candidate(w: AttentionWeights, left, right, stats: SiteStats, name: str, compute_dtype,
                        warn, refit: bool) -> Candidate:
    """V-O whitened by what O really reads: the attention-mixed values ``u_h = V z_h`` of each head.

    The output error of head h is ``E||(O_h - O_h' P) u_h||^2``; with the group's heads' second moments of u
    pooled, the SVD of ``O_stack L_u`` minimises it. Everything lives in the d-dim span of V, so the new V is
    ``P V`` with P the right factor of that SVD (exact at full rank).
    """
    groups, d = w.num_kv_heads, w.vo_dim
    moment = stats.head_output.to(compute_dtype).reshape(groups, w.group_size, d, d).sum(1)
    chol = cholesky_factor(moment, name=f"{name} attention-mixed values", warn=warn)
    eye = torch.eye(d, dtype=compute_dtype).expand(groups, d, d)
    out = decompose(left, eye, right_whiten=chol, compute_dtype=compute_dtype)
    c = Candidate("vo", "whitened", out.left, right @ out.right, out.s.pow(2))
    c.projection = out.right.mT  # (G, d, d): row j maps a value u to kept direction j
    if refit:
        c.head_moments = stats.head_output.to(compute_dtype).reshape(groups, w.group_size, d, d)
        c.head_o = left.reshape(groups, w.group_size, -1, d)
    return c


def candidate(weights: AttentionWeights, kind: PairKind, criterion: str, *, rotary: bool, name: str,
              stats: SiteStats | None = None, compute_dtype=torch.float64, warn=None,
              vo_whitening: str = "input", vo_refit: bool = True) -> Candidate:
    if criterion not in CRITERIA:
        raise CloverError(f"unknown criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    if kind == "qk" and rotary and criterion not in ROTARY_CRITERIA:
        raise CloverError(
            f"{name}: criterion {criterion!r} cannot prune Q-K under rotary embeddings: the rotation sits between "
            "Q and K, so no change of basis (CLOVER or per-channel) is exact there. Use --qk-criterion "
            "rotary-weight or rotary-activation (whole frequency pairs), or prune V-O only")
    if criterion in ROTARY_CRITERIA and not (kind == "qk" and rotary):
        raise CloverError(f"{name}: criterion {criterion!r} is for Q-K under rotary embeddings only; "
                          f"use one of {', '.join(PAIR_CRITERIA)}")
    if criterion in DATA_AWARE and stats is None:
        raise CloverError(f"criterion {criterion!r} needs calibration data: pass --calib (or set CLOVER_DATA)")

    left, right = (f.to(compute_dtype) for f in factors(weights, kind))
    if criterion in ROTARY_CRITERIA:
        return _rotary_candidate(weights, criterion, left, right, stats)
    if criterion == "vanilla":
        scores = (left.norm(dim=1) * right.norm(dim=1)).pow(2)
        return _sorted_candidate(kind, criterion, left, right, scores)
    if criterion == "clover":
        out = decompose(left, right, compute_dtype=compute_dtype)
        return Candidate(kind, criterion, out.left, out.right, out.s.pow(2))
    if kind == "vo" and vo_whitening == "mixed":
        return _mixed_vo_candidate(weights, left, right, stats, name, compute_dtype, warn, vo_refit)
    left_chol, right_chol = _whitening(weights, stats, kind, name, warn)
    out = decompose(left, right, left_whiten=left_chol, right_whiten=right_chol, compute_dtype=compute_dtype)
    return Candidate(kind, criterion, out.left, out.right, out.s.pow(2))


def _rotary_candidate(w: AttentionWeights, criterion: str, left, right, stats) -> Candidate:
    """Score frequency pairs per KV group: q energy (summed over the group's heads) times k energy."""
    groups, d = w.num_kv_heads, w.qk_dim
    half = d // 2
    if criterion == "rotary-weight":
        q_energy = left.pow(2).sum(dim=1)  # (G, d): over the group's stacked heads and inputs
        k_energy = right.pow(2).sum(dim=1)
    else:
        q_energy = stats.q_channel_sq.reshape(groups, w.group_size, d).sum(1).to(left.dtype)
        k_energy = stats.k_channel_sq.reshape(groups, d).to(left.dtype)
    pair = lambda e: e[:, :half] + e[:, half:]  # noqa: E731
    scores = pair(q_energy) * pair(k_energy)
    order = scores.argsort(dim=-1, descending=True)
    return Candidate("qk", criterion, left, right, torch.gather(scores, 1, order), order=order)
