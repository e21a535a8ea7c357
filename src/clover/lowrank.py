"""Weighted low-rank maps and rotary components: pure math, no model knowledge (used by latent KV and MLA).

Maps act on homogeneous input rows (``x~ = [x, 1]``, so biases ride along): ``y = x~ @ W`` with ``W`` of shape
(inputs + 1, outputs). Errors are measured on calibration inputs with second moment ``C = L L^T`` and weighted on
the output side by ``R`` (what an output error costs downstream), i.e. ``E ||x~ (W - W') R||^2``. The best
rank-r ``W'`` is then a truncated SVD of ``L^T W R`` mapped back, and the dropped squared singular values are the
error, so every candidate dimension has a price in the same units as its kind's other dimensions.

Two input metrics: a map whose output columns are read through different inputs (an MLA latent's keys are read at
the key positions, its values through the attention-mixed inputs) has no SVD solution; ``joint_lowrank`` refines a
shared ``down`` by alternating least squares, each step exact.

Read-out refit: the O block that best follows a fixed narrower value map, per head, on attention-mixed inputs.

Rotary components: RoPE turns channel pair ``(f, f + d/2)`` of every KV head by the same phase, i.e. multiplies
the complex channel ``z_g,f = k_g[f] + i k_g[f + d/2]`` by ``e^{i theta_f t}``. A complex mix across heads within
one frequency commutes with that, so a per-frequency PCA of ``z_.,f`` (weighted by the query energy each head
serves) gives components that can be cached after rotation, exactly. Everything here runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """``W ~= down @ up``; columns of ``down`` / rows of ``up`` sorted by decreasing ``s`` (weighted singular
    values, so dropping direction i costs ``s[i]**2``). down: (inputs + 1, k), up: (k, outputs)."""

    down: torch.Tensor
    up: torch.Tensor
    s: torch.Tensor

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down[:, :rank], self.up[:rank]


def sym_sqrt(gram: torch.Tensor, floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse (eigenvalues floored relative to the largest)."""
    values, vectors = torch.linalg.eigh(gram)
    values = values.clamp_min(floor * values.max().clamp_min(1e-300))
    root = values.sqrt()
    return (vectors * root) @ vectors.mT, (vectors / root) @ vectors.mT


def weighted_lowrank(weight: torch.Tensor, chol: torch.Tensor, out_root: torch.Tensor,
                     out_root_inv: torch.Tensor) -> LowRank:
    """All directions of ``weight`` (inputs + 1, outputs) ranked by ``E ||x~ dW R||^2`` (``chol``: lower Cholesky
    factor of the inputs' second moment; ``out_root`` = R, ``out_root_inv`` = R^-1). sqrt(s) goes to each side, so
    neither factor carries the whole scale (as CLOVER writes its pairs)."""
    u, s, vh = torch.linalg.svd(chol.mT @ weight @ out_root, full_matrices=False)
    root = s.sqrt()
    down = torch.linalg.solve_triangular(chol.mT, u * root, upper=True)
    up = (root[:, None] * vh) @ out_root_inv
    return LowRank(down, up, s)


@dataclass
class JointLowRank:
    """``[first, second] ~= down @ up``; ``error`` / ``total``: the weighted squared error left and the one with
    nothing kept (so ``1 - error / total`` is the share kept), ``iterations`` taken."""

    down: torch.Tensor
    up: torch.Tensor
    error: float
    total: float
    iterations: int


def _weighted_error(cov: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ((cov @ residual) * (residual @ weight)).sum()


def joint_lowrank(first: torch.Tensor, second: torch.Tensor, chol: torch.Tensor, cov_second: torch.Tensor,
                  weight_first: torch.Tensor, weight_second: torch.Tensor, down: torch.Tensor,
                  iterations: int = 30, tol: float = 1e-6) -> JointLowRank:
    """A shared rank-r ``down`` (inputs, r) and read-outs ``up_1``, ``up_2`` minimising

        tr(E_1^T C_1 E_1 W_1) + tr(E_2^T C_2 E_2 W_2),  E_i = X_i - down up_i,

    where ``first`` / ``second`` are X_1 (inputs, n_1) / X_2 (inputs, n_2), C_i their input moments (``chol``: the
    lower Cholesky factor of C_1, as ``weighted_lowrank`` takes it; ``cov_second``: C_2) and W_i their output
    weights (PSD). Alternating least squares from ``down`` (a start such as the SVD under C_1 for both): with
    ``down`` fixed each ``up_i`` is its own least squares; with the ``up_i`` fixed the stationarity condition
    ``C_1 A P + C_2 A Q = G`` is solved exactly in the basis ``T`` that diagonalises both moments (``T^T C_1 T = I``,
    ``T^T C_2 T = diag(lam)``), where it decouples into one r x r system per row. Each step can only lower the error;
    it stops after ``iterations`` or when a step gains less than ``tol`` of it."""
    dtype = first.dtype
    cov_first = chol @ chol.mT
    whitened = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, cov_second, upper=False).mT,
                                             upper=False)
    lam, basis = torch.linalg.eigh((whitened + whitened.mT) / 2)
    lam = lam.clamp_min(1e-12 * lam.max().clamp_min(1e-300))
    to_basis = torch.linalg.solve_triangular(chol.mT, basis, upper=True)  # T: inputs x inputs
    pull_first, pull_second = cov_first @ first @ weight_first, cov_second @ second @ weight_second
    total = float(_weighted_error(cov_first, first, weight_first) + _weighted_error(cov_second, second, weight_second))

    def read_outs(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for cov, target in ((cov_first, first), (cov_second, second)):
            gram = a.mT @ cov @ a
            gram = gram + 1e-12 * gram.diagonal().mean().clamp_min(1e-300) * torch.eye(a.shape[1], dtype=dtype)
            outs.append(torch.linalg.solve(gram, a.mT @ cov @ target))
        return outs[0], outs[1]

    def error(a, up_1, up_2) -> float:
        return float(_weighted_error(cov_first, first - a @ up_1, weight_first)
                     + _weighted_error(cov_second, second - a @ up_2, weight_second))

    up_1, up_2 = read_outs(down)
    current, taken = error(down, up_1, up_2), 0
    for taken in range(1, iterations + 1):
        p, q = up_1 @ weight_first @ up_1.mT, up_2 @ weight_second @ up_2.mT
        both = p + q
        both = both + 1e-12 * both.diagonal().mean().clamp_min(1e-300) * torch.eye(both.shape[0], dtype=dtype)
        root = torch.linalg.cholesky(both)
        inner = torch.linalg.solve_triangular(root, torch.linalg.solve_triangular(root, q, upper=False).mT,
                                              upper=False)
        gamma, vectors = torch.linalg.eigh((inner + inner.mT) / 2)
        mix = torch.linalg.solve_triangular(root.mT, vectors, upper=True)  # R: R^T (P + Q) R = I, R^T Q R = diag
        rhs = to_basis.mT @ (pull_first @ up_1.mT + pull_second @ up_2.mT)
        y = ((rhs @ mix) / (1 + (lam[:, None] - 1) * gamma[None, :])) @ mix.mT
        candidate = to_basis @ y
        new_1, new_2 = read_outs(candidate)
        new = error(candidate, new_1, new_2)
        if new > current:  # rounding: keep the last step that lowered the error
            break
        gained = current - new
        down, up_1, up_2, current = candidate, new_1, new_2, new
        if gained <= tol * max(current, 1e-300):
            break
    return JointLowRank(down, torch.cat([up_1, up_2], dim=1), current, total, taken)


def complex_channels(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(inputs + 1, heads * head_dim) real map -> (inputs + 1, heads, head_dim / 2) complex map of the rotary
    channels ``z[f] = y[f] + i y[f + head_dim / 2]`` (rotate-half layout)."""
    shaped = weight.reshape(weight.shape[0], heads, head_dim)
    half = head_dim // 2
    return torch.complex(shaped[..., :half], shaped[..., half:])


def real_channels(z: torch.Tensor) -> torch.Tensor:
    """Inverse of ``complex_channels``: (inputs + 1, heads, half) complex -> (inputs + 1, heads * 2 half) real."""
    return torch.cat([z.real, z.imag], dim=-1).reshape(z.shape[0], -1)


def channel_energy(weight: torch.Tensor, cov: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """E |z_h,f|^2 for every head and frequency of the map ``weight`` on inputs with second moment ``cov``."""
    per_channel = ((cov @ weight) * weight).sum(0).reshape(heads, head_dim)
    half = head_dim // 2
    return per_channel[:, :half] + per_channel[:, half:]


@dataclass
class RotaryComponents:
    """Per frequency f: ``energy[f, j]`` captured by component j (descending over j), ``encode[f]`` (G comps x G
    heads: component j = sum_g encode[f, j, g] z_g) and ``decode[f]`` (G heads x G comps: z_g ~= sum_j
    decode[f, g, j] c_j). Keeping every component is exact: decode @ encode = I."""

    energy: torch.Tensor  # (half, G)
    encode: torch.Tensor  # (half, G, G) complex
    decode: torch.Tensor  # (half, G, G) complex


def rotary_components(keys: torch.Tensor, cov: torch.Tensor, weight: torch.Tensor,
                      moment: torch.Tensor | None = None) -> RotaryComponents:
    """Weighted PCA of the KV heads' complex key channels, one frequency at a time.

    ``keys``: complex map (inputs + 1, G, half); ``weight``: (G, half) positive, the square root of the query
    energy each head's channel serves, so that the captured energy estimates the score error it avoids.
    ``moment``: (half, G, G) the channels' second moment if not the one ``cov`` implies (e.g. weighted by the
    attention each key position receives).
    """
    if moment is None:
        moment = torch.einsum("ngf,nm,mhf->fgh", keys, cov.to(keys.dtype), keys.conj())  # E[z_g conj(z_h)] per f
    w = weight.T.to(moment.dtype)  # (half, G)
    values, vectors = torch.linalg.eigh(w[:, :, None] * moment * w[:, None, :].conj())
    values, vectors = values.flip(-1), vectors.flip(-1)  # strongest first
    encode = vectors.conj().mT * w[:, None, :]
    decode = vectors / w[:, :, None]
    return RotaryComponents(values.clamp_min(0), encode, decode)


def refit_readout(u: torch.Tensor, moment: torch.Tensor, target: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
    """The read-out that best follows a fixed narrower map: ``x u R'`` against ``x target readout^T`` in least
    squares over inputs with second moment ``moment``. ``u``: (inputs, k) the new map, ``target``: (inputs, d) the
    old one, ``readout``: (outputs, d) what read it. Returns (outputs, k); a 1e-9 relative ridge keeps directions the
    inputs never excite at zero. Used per head for O blocks over attention-mixed inputs (latent KV, MLA)."""
    gram = u.mT @ moment @ u
    gram = gram + 1e-9 * gram.diagonal().mean().clamp_min(1e-300) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return readout @ torch.linalg.solve(gram, u.mT @ moment @ target).mT
