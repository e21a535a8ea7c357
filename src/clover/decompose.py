"""The math of CLOVER, with no model knowledge.

Two thin factors meet only through their product ``M = left @ right.T`` (rank <= d). We rewrite them as
``left' = U sqrt(S)`` and ``right' = V sqrt(S)`` where ``U S V^T`` is the SVD of M, so the product is unchanged
but each of the d columns is now an orthogonal direction ranked by its singular value.

Forming M (size m x n, e.g. (D+1) x (D+1)) and calling a full SVD costs O(m n min(m, n)); instead we take a thin
QR of each factor and the SVD of the d x d core ``R_left R_right^T``. Same decomposition, O((m + n) d^2).

Optional whitening makes the ranking data-aware: with input covariances ``C = L L^T`` the SVD is taken of
``(L_left^T left)(L_right^T right)^T``, whose truncation minimises the *output* error on those inputs, and the
factors are mapped back with ``L^-T`` afterwards. At full rank the rewrite stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """Rewritten factors, directions sorted by decreasing singular value ``s``.

    left: (..., m, d), right: (..., n, d), s: (..., d). ``left @ right.mT`` equals the input product.
    """

    left: torch.Tensor
    right: torch.Tensor
    s: torch.Tensor


def _apply_block(x: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """Multiply ``mat`` onto the rows of ``x``, blockwise when x stacks several copies of the same input.

    Stacked Q heads of one GQA group all read the same input, so one whitening factor of the input's size
    serves every block of ``x``'s rows.
    """
    rows, block = x.shape[-2], mat.shape[-1]
    if rows == block:
        return mat @ x
    if rows % block:
        raise ValueError(f"whitening factor of size {block} does not tile a factor with {rows} rows")
    shaped = x.reshape(*x.shape[:-2], rows // block, block, x.shape[-1])
    return (mat.unsqueeze(-3) @ shaped).reshape(x.shape)


def _thin_svd(left: torch.Tensor, right: torch.Tensor) -> Factors:
    """SVD of ``left @ right.mT`` through thin QRs and a small core; pads to d directions if a side is short."""
    d = left.shape[-1]
    q_left, r_left = torch.linalg.qr(left)  # (m, k1), (k1, d)
    q_right, r_right = torch.linalg.qr(right)  # (n, k2), (k2, d)
    u, s, vh = torch.linalg.svd(r_left @ r_right.mT)  # core (k1, k2)
    k = s.shape[-1]
    root = s.clamp_min(0).sqrt()
    new_left = (q_left @ u[..., :, :k]) * root.unsqueeze(-2)
    new_right = (q_right @ vh[..., :k, :].mT) * root.unsqueeze(-2)
    if k < d:  # a side had fewer rows than d: the missing directions have singular value 0
        pad = d - k
        new_left = torch.nn.functional.pad(new_left, (0, pad))
        new_right = torch.nn.functional.pad(new_right, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad))
    return Factors(new_left, new_right, s)


def decompose(
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    left_whiten: torch.Tensor | None = None,
    right_whiten: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Factors:
    """Orthogonalise the pair ``(left, right)``; batched over leading dims.

    ``left_whiten`` / ``right_whiten`` are lower-triangular Cholesky factors L of the input covariance on that
    side (size of the side's rows, or of one block when the side stacks several heads over the same input).
    Results are in ``compute_dtype``; the caller casts back to the model's dtype.
    """
    if left.shape[:-2] != right.shape[:-2] or left.shape[-1] != right.shape[-1]:
        raise ValueError(f"factors do not pair: left {tuple(left.shape)} vs right {tuple(right.shape)}")
    left = left.to(compute_dtype)
    right = right.to(compute_dtype)
    if left_whiten is not None:
        left = _apply_block(left, left_whiten.to(compute_dtype).mT)
    if right_whiten is not None:
        right = _apply_block(right, right_whiten.to(compute_dtype).mT)
    out = _thin_svd(left, right)
    if left_whiten is not None:
        out.left = _unwhiten(out.left, left_whiten.to(compute_dtype))
    if right_whiten is not None:
        out.right = _unwhiten(out.right, right_whiten.to(compute_dtype))
    return out


def _unwhiten(x: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Map whitened factors back: solve ``L^T y = x`` blockwise (never an explicit inverse)."""
    rows, block = x.shape[-2], chol.shape[-1]
    shaped = x.reshape(*x.shape[:-2], rows // block, block, x.shape[-1])
    solved = torch.linalg.solve_triangular(chol.mT.unsqueeze(-3), shaped, upper=True)
    return solved.reshape(x.shape)


def spectrum(left: torch.Tensor, right: torch.Tensor, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of ``left @ right.mT`` without rewriting anything (for inspection)."""
    left, right = left.to(compute_dtype), right.to(compute_dtype)
    r_left = torch.linalg.qr(left, mode="r")[1]
    r_right = torch.linalg.qr(right, mode="r")[1]
    s = torch.linalg.svdvals(r_left @ r_right.mT)
    d = left.shape[-1]
    return torch.nn.functional.pad(s, (0, d - s.shape[-1])) if s.shape[-1] < d else s
