"""What the key components without a rotated place keep: one complex factor per head and frequency, folded into
the unrotated query weights (nothing added at run time). Pure math, float64.

In the original model, head h scores an unrotated component pair at frequency f as
``Re(s_hf(m, n) exp(i theta_f (m - n)))`` with ``s_hf = sum_j p_hjf(m) conj(c_jf(n))``; the format can only
compute ``Re(alpha_hf s_hf(m, n))``. Three choices of ``alpha``:

- ``nope``: 1, the rotation dropped (TransMLA, MHA2MLA);
- ``expected``: the attention-weighted mean of ``exp(i theta_f (m - n))`` under the original attention (exact in
  expectation: the mean of the rotation over the pairs attention actually reads; near 1 for slow frequencies,
  shrinking fast ones whose phase averages out);
- ``refit``: least squares of the summed unrotated score over every frequency against the original's, on
  calibration windows, each (query, key) pair weighted half by the original attention and half uniformly over
  the causal row (a key that is read must keep its score; one that is not must not gain one).
"""

from __future__ import annotations

import torch

from .attention import LayerAttention, original_attention, phases

ALPHAS = ("nope", "expected", "refit")


def score_fit(attention: LayerAttention, q: torch.Tensor, k: torch.Tensor, p: torch.Tensor, c: torch.Tensor,
              unrotated: torch.Tensor, heads: int, kv_heads: int, head_dim: int, inv_freq: torch.Tensor,
              query_stride: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normal equations of the refit on ``attention.inputs``: per head, (gram (2F, 2F), rhs (2F,), const) with the
    weighted squared score error of ``alpha`` = ``a^T gram a - 2 a^T rhs + const``, ``a = [Re alpha, Im alpha]``.

    ``q``/``k``: the original maps (D, H d) / (D, G d) (for the original attention); ``p``: (D, H, J, F) complex
    query maps per component; ``c``: (D, J, F) the component maps; ``unrotated``: (J, F) bool, the entries without
    a rotated place. Every ``query_stride``-th query position of each window is used.
    """
    frequencies = p.shape[-1]
    mask = unrotated.to(p.dtype)
    gram = torch.zeros(heads, 2 * frequencies, 2 * frequencies, dtype=q.dtype)
    rhs = torch.zeros(heads, 2 * frequencies, dtype=q.dtype)
    const = torch.zeros(heads, dtype=q.dtype)
    for x in attention.inputs:
        t = x.shape[0]
        attn = original_attention(x, q, k, heads, kv_heads, head_dim, inv_freq)
        rows = torch.arange(0, t, query_stride)
        weight = 0.5 * attn[:, rows] + 0.5 * torch.ones(t, t, dtype=x.dtype).tril()[rows] / (rows[:, None] + 1)
        turn = phases((rows[:, None] - torch.arange(t)[None]).to(x.dtype), inv_freq)  # (m, T, F)
        keys = torch.einsum("td,djf->tjf", x.to(c.dtype), c)  # (T, J, F)
        for h in range(heads):
            queries = torch.einsum("td,djf->tjf", x[rows].to(p.dtype), p[:, h]) * mask  # (m, J, F)
            s = torch.einsum("mjf,njf->mnf", queries, keys.conj())  # (m, T, F)
            target = (s * turn).real.sum(-1).reshape(-1)
            features = torch.cat([s.real, -s.imag], dim=-1).reshape(-1, 2 * frequencies)  # Re(alpha s)
            weighted = features * weight[h].reshape(-1, 1)
            gram[h] += weighted.T @ features
            rhs[h] += weighted.T @ target
            const[h] += (weight[h].reshape(-1) * target.square()).sum()
    return gram, rhs, const


def score_error(fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
    """(H,) weighted squared score error of ``alpha`` (H, F) under ``score_fit``'s normal equations."""
    gram, rhs, const = fit
    a = torch.cat([alpha.real, alpha.imag], dim=-1).to(gram.dtype)
    return torch.einsum("hi,hij,hj->h", a, gram, a) - 2 * (a * rhs).sum(-1) + const


def refit(fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(H, F) complex ``alpha`` minimising ``score_error``; a ridge towards 1 (the rotation dropped) keeps
    frequencies the data never excites where they were."""
    gram, rhs, _ = fit
    frequencies = gram.shape[-1] // 2
    prior = torch.cat([torch.ones(frequencies), torch.zeros(frequencies)]).to(gram.dtype)
    ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(2 * frequencies, dtype=gram.dtype)
    solution = torch.linalg.solve(gram + ridge * eye, (rhs + ridge[:, :, 0] * prior)[..., None])[..., 0]
    return torch.complex(solution[:, :frequencies], solution[:, frequencies:])
