"""The MLA conversion's MLP refit (``mla/mlp.py``): each down projection is the ridge least-squares fit of the
layer's output to the original stream, kept only where the held-out windows improve, and the stock model still
computes clover's reference of the function with the refit MLPs in it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from clover.errors import CloverError
from clover.mla import MlaConfig, to_mla
from clover.mla import mlp as mlp_refit

# 20 training windows of 32 tokens: enough for the tiny model's 128-wide MLP (8 leave it overfit, and nothing kept)
CALIB = torch.randint(0, 300, (24, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gqa():
    return tiny_llama(vocab_size=300, num_key_value_heads=2)


class Block(nn.Module):
    """A residual layer with a LLaMA-style MLP: what ``refit_layer`` reads of a decoder layer."""

    def __init__(self, dim: int = 6, width: int = 10):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(dim, width, bias=False)
        self.mlp.down_proj = nn.Linear(width, dim, bias=False)

    def forward(self, hidden, **kwargs):
        return hidden + self.mlp.down_proj(torch.tanh(self.mlp.up_proj(hidden)))


def states(n: int, seed: int, dim: int = 6) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 9, dim, generator=gen, dtype=torch.float64), {}) for _ in range(n)]


def test_the_new_down_projection_is_the_ridge_least_squares_fit_and_held_out_windows_decide():
    torch.manual_seed(0)
    block = Block().double()
    w0 = block.mlp.down_proj.weight.detach().clone()
    stream = states(6, 1)
    other = Block().double()  # the same MLP with another down projection, and noise: reachable, not exactly
    other.mlp.up_proj.load_state_dict(block.mlp.up_proj.state_dict())
    noise = states(6, 2)
    with torch.no_grad():
        targets = [(other(hidden) + 0.05 * n, {}) for (hidden, _), (n, _) in zip(stream, noise)]
    new, fit, after = mlp_refit.refit_layer(block, stream, targets, n_train=4, ridges=(0.1,))

    def features(window):
        return torch.tanh(block.mlp.up_proj(window[0])).reshape(-1, 10).detach()

    a = torch.cat([features(s) for s in stream[:4]])
    residual = torch.cat([(t[0] - s[0]).reshape(-1, 6) for s, t in zip(stream[:4], targets[:4])])
    lam = 0.1 * float(a.square().sum(0).mean())  # ridge x the mean diagonal of the Gram matrix
    # min ||a W^T - residual||^2 + lam ||W - W0||^2, as one stacked least-squares problem
    stacked = torch.cat([a, lam**0.5 * torch.eye(10, dtype=a.dtype)])
    goal = torch.cat([residual, lam**0.5 * w0.T])
    expected = torch.linalg.lstsq(stacked, goal).solution.T
    assert fit.kept and fit.after < fit.before
    assert torch.allclose(new, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    assert torch.equal(block.mlp.down_proj.weight, new) and not torch.allclose(new, w0)
    energy = sum(float(t[0].square().sum()) for t in targets[4:])
    with torch.no_grad():
        err = sum(float((block(s[0]) - t[0]).square().sum()) for s, t in zip(stream[4:], targets[4:]))
    assert err / energy == pytest.approx(fit.after, rel=1e-9) and fit.ridge == 0.1
    with torch.no_grad():
        assert all(torch.equal(out, block(s[0])) for (out, _), s in zip(after, stream))  # the stream after the block


def test_each_layer_takes_the_ridge_closest_on_the_held_out_windows():
    block = Block().double()
    other = Block().double()
    other.mlp.up_proj.load_state_dict(block.mlp.up_proj.state_dict())
    stream, noise = states(6, 4), states(6, 5)
    with torch.no_grad():
        targets = [(other(hidden) + 0.3 * n, {}) for (hidden, _), (n, _) in zip(stream, noise)]
    errors = {}
    for ridge in (1e-3, 1.0, 30.0):
        copy = Block().double()
        copy.load_state_dict(block.state_dict())
        errors[ridge] = mlp_refit.refit_layer(copy, stream, targets, n_train=4, ridges=(ridge,))[1].after
    _, fit, _ = mlp_refit.refit_layer(block, stream, targets, n_train=4, ridges=tuple(errors))
    assert len(set(errors.values())) == 3  # the ridge matters here
    assert fit.ridge == min(errors, key=errors.get) and fit.after == errors[fit.ridge]


def test_a_layer_already_on_target_is_left_alone():
    block = Block().double()
    w0 = block.mlp.down_proj.weight.detach().clone()
    stream = states(5, 3)
    with torch.no_grad():
        targets = [(block(hidden), {}) for hidden, _ in stream]
    new, fit, _ = mlp_refit.refit_layer(block, stream, targets, n_train=3)
    assert new is None and not fit.kept and fit.before == 0.0
    assert torch.equal(block.mlp.down_proj.weight, w0)


def test_the_mlp_refit_keeps_what_helps_and_the_stock_model_computes_its_reference(gqa):
    """End to end: the fits are reported per layer, a layer whose fit was kept has a new down projection and the
    others the original's, and ``convert.verify`` passed with the refit MLPs in clover's reference (it compares
    the stock model against a reference that takes them from ``mlp.refit``'s result, not from the stock model)."""
    fields = dict(calibration=CALIB, kv_ratio=0.6, rope_dims=8, progress=False, split=4.0)
    mla, report = to_mla(gqa, MlaConfig(mlp_refit=True, **fields))
    plain, solved = to_mla(gqa, MlaConfig(**fields))
    fits = [layer.mlp for layer in report.layers]
    assert all(layer.mlp is None for layer in solved.layers)
    assert all(fit.kept == (fit.after < fit.before) for fit in fits) and any(fit.kept for fit in fits)
    for fit, ours, original in zip(fits, mla.model.layers, gqa.model.layers, strict=True):
        same = torch.equal(ours.mlp.down_proj.weight, original.mlp.down_proj.weight)
        assert same != fit.kept
        assert torch.equal(ours.mlp.up_proj.weight, original.mlp.up_proj.weight)
    assert report.check["passed"] and any("MLP refit" in note for note in report.notes)
    assert report.split == solved.split == 4.0  # a fixed split: the held-out windows serve the MLP refit alone


def test_the_mlp_refit_has_no_place_in_the_gqa_layout(gqa):
    with pytest.raises(CloverError, match="refits the MLPs after MLA blocks"):
        to_mla(gqa, MlaConfig(layout="gqa", mlp_refit=True, calibration=CALIB, progress=False))


def test_the_mlp_refit_needs_held_out_windows_beyond_the_ones_it_fits_on(gqa):
    with pytest.raises(CloverError, match="whether a refit is kept needs 4 held-out calibration windows"):
        to_mla(gqa, MlaConfig(mlp_refit=True, split=4.0, calibration=CALIB[:4], progress=False))
