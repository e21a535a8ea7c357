import pytest
import torch

from clover.decompose import decompose, spectrum


def _random_pair(groups=3, m=2 * 33, n=33, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(groups, m, d, generator=g), torch.randn(groups, n, d, generator=g)


def test_product_is_preserved_and_directions_are_orthogonal_and_sorted():
    left, right = _random_pair()
    out = decompose(left, right)
    product = left.double() @ right.double().mT
    assert torch.allclose(out.left @ out.right.mT, product, atol=1e-10)
    gram_left = out.left.mT @ out.left
    gram_right = out.right.mT @ out.right
    diag = torch.diag_embed(out.s)
    assert torch.allclose(gram_left, diag, atol=1e-9)  # U^T U = I scaled by S: orthogonal, sqrt(S) each side
    assert torch.allclose(gram_right, diag, atol=1e-9)
    assert bool((out.s[..., :-1] >= out.s[..., 1:]).all())


def test_singular_values_match_full_svd_of_product():
    left, right = _random_pair()
    out = decompose(left, right)
    full = torch.linalg.svdvals(left.double() @ right.double().mT)[..., : left.shape[-1]]
    assert torch.allclose(out.s, full, atol=1e-10)
    assert torch.allclose(spectrum(left, right), full, atol=1e-10)


def test_truncation_is_the_best_low_rank_approximation():
    left, right = _random_pair(groups=1)
    out = decompose(left, right)
    k = 3
    approx = out.left[..., :k] @ out.right[..., :k].mT
    err = torch.linalg.matrix_norm(left.double() @ right.double().mT - approx)
    assert torch.allclose(err, out.s[..., k:].norm(dim=-1), atol=1e-9)  # Eckart-Young


def test_whitened_rewrite_is_exact_and_minimises_weighted_error():
    left, right = _random_pair(groups=2, m=2 * 33, n=33)
    g = torch.Generator().manual_seed(1)
    spread = torch.linspace(0.1, 3, 33, dtype=torch.float64)[:, None]
    x = torch.randn(33, 400, generator=g, dtype=torch.float64) * spread
    chol = torch.linalg.cholesky(x @ x.T / 400)
    out = decompose(left, right, left_whiten=chol, right_whiten=chol)
    product = left.double() @ right.double().mT
    assert torch.allclose(out.left @ out.right.mT, product, atol=1e-9)
    # The whitened truncation beats the plain one on the data-weighted error it was built for.
    plain = decompose(left, right)
    k = 4

    def weighted_err(f):
        diff = product - f.left[..., :k] @ f.right[..., :k].mT
        return (diff @ x).norm()

    assert weighted_err(out) < weighted_err(plain)


def test_short_side_pads_with_zero_directions():
    left, right = _random_pair(groups=1, m=5, n=40, d=8)
    out = decompose(left, right)
    assert out.s.shape == (1, 8) and bool((out.s[0, 5:] == 0).all())
    assert torch.allclose(out.left @ out.right.mT, left.double() @ right.double().mT, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compute_dtype(dtype):
    left, right = _random_pair()
    out = decompose(left, right, compute_dtype=dtype)
    assert out.left.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 1e-10
    assert torch.allclose(out.left @ out.right.mT, (left.double() @ right.double().mT).to(dtype), atol=tol)


def test_mismatched_factors_are_refused():
    with pytest.raises(ValueError, match="do not pair"):
        decompose(torch.randn(2, 10, 4), torch.randn(2, 10, 5))
