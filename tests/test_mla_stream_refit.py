"""The MLA conversion's stream refit (``mla/stream.py``): each refit projection (attention's O, the MLP's down) is
the ridge least-squares fit of the stream at its write point to the original stream there, kept only where the
held-out windows improve, and the stock model still computes clover's reference of the function with the refit
projections in it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from clover.errors import CloverError
from clover.mla import MlaConfig, to_mla
from clover.mla import stream as stream_refit

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
        targets = [other(hidden) + 0.05 * n for (hidden, _), (n, _) in zip(stream, noise)]
    new, fit, after = stream_refit.refit_layer(block, stream, targets, n_train=4, ridges=(0.1,))

    def features(window):
        return torch.tanh(block.mlp.up_proj(window[0])).reshape(-1, 10).detach()

    a = torch.cat([features(s) for s in stream[:4]])
    residual = torch.cat([(t - s[0]).reshape(-1, 6) for s, t in zip(stream[:4], targets[:4])])
    lam = 0.1 * float(a.square().sum(0).mean())  # ridge x the mean diagonal of the Gram matrix
    # min ||a W^T - residual||^2 + lam ||W - W0||^2, as one stacked least-squares problem
    stacked = torch.cat([a, lam**0.5 * torch.eye(10, dtype=a.dtype)])
    goal = torch.cat([residual, lam**0.5 * w0.T])
    expected = torch.linalg.lstsq(stacked, goal).solution.T
    assert fit.kept and fit.after < fit.before
    assert torch.allclose(new, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))
    assert torch.equal(block.mlp.down_proj.weight, new) and not torch.allclose(new, w0)
    energy = sum(float(t.square().sum()) for t in targets[4:])
    with torch.no_grad():
        err = sum(float((block(s[0]) - t).square().sum()) for s, t in zip(stream[4:], targets[4:]))
    assert err / energy == pytest.approx(fit.after, rel=1e-9) and fit.ridge == 0.1
    with torch.no_grad():
        assert all(torch.equal(out, block(s[0])) for (out, _), s in zip(after, stream))  # the stream after the block


def test_each_layer_takes_the_ridge_closest_on_the_held_out_windows():
    block = Block().double()
    other = Block().double()
    other.mlp.up_proj.load_state_dict(block.mlp.up_proj.state_dict())
    stream, noise = states(6, 4), states(6, 5)
    with torch.no_grad():
        targets = [other(hidden) + 0.3 * n for (hidden, _), (n, _) in zip(stream, noise)]
    errors = {}
    for ridge in (1e-3, 1.0, 30.0):
        copy = Block().double()
        copy.load_state_dict(block.state_dict())
        errors[ridge] = stream_refit.refit_layer(copy, stream, targets, n_train=4, ridges=(ridge,))[1].after
    _, fit, _ = stream_refit.refit_layer(block, stream, targets, n_train=4, ridges=tuple(errors))
    assert len(set(errors.values())) == 3  # the ridge matters here
    assert fit.ridge == min(errors, key=errors.get) and fit.after == errors[fit.ridge]


def test_a_layer_already_on_target_is_left_alone():
    block = Block().double()
    w0 = block.mlp.down_proj.weight.detach().clone()
    stream = states(5, 3)
    with torch.no_grad():
        targets = [block(hidden) for hidden, _ in stream]
    new, fit, _ = stream_refit.refit_layer(block, stream, targets, n_train=3)
    assert new is None and not fit.kept and fit.before == 0.0
    assert torch.equal(block.mlp.down_proj.weight, w0)


@pytest.mark.parametrize("projections", [("down",), ("o", "down")])
def test_the_stream_refit_keeps_what_helps_and_the_stock_model_computes_its_reference(gqa, projections):
    """End to end: the fits are reported per layer and projection, a projection whose fit was kept has a new
    weight and the others the converted one, nothing else moves, and ``convert.verify`` passed with the refit
    projections in clover's reference (it compares the stock model against a reference that takes them from
    ``stream.refit``'s result, not from the stock model)."""
    fields = dict(calibration=CALIB, kv_ratio=0.6, rope_dims=8, progress=False, split=4.0)
    mla, report = to_mla(gqa, MlaConfig(stream_refit=projections, **fields))
    # the same conversion before the refit: it calibrated on the windows the refit's held-out ones leave
    plain, solved = to_mla(gqa, MlaConfig(**{**fields, "calibration": CALIB[:-4]}))
    assert all(layer.stream == {} for layer in solved.layers)
    assert all(tuple(layer.stream) == projections for layer in report.layers)
    sites = {"o": lambda layer: layer.self_attn.o_proj.weight, "down": lambda layer: layer.mlp.down_proj.weight}
    for projection in projections:
        fits = [layer.stream[projection] for layer in report.layers]
        assert all(fit.kept == (fit.after < fit.before) for fit in fits) and any(fit.kept for fit in fits)
        for fit, ours, before in zip(fits, mla.model.layers, plain.model.layers, strict=True):
            assert torch.equal(sites[projection](ours), sites[projection](before)) != fit.kept
    for ours, before in zip(mla.model.layers, plain.model.layers, strict=True):
        assert torch.equal(ours.mlp.up_proj.weight, before.mlp.up_proj.weight)
        for name in ("q_proj", "kv_a_proj_with_mqa"):
            assert torch.equal(getattr(ours.self_attn, name).weight, getattr(before.self_attn, name).weight)
        if "o" not in projections:  # a new O re-balances its pairs' scale with kv_b's value rows (balance_pairs)
            assert torch.equal(ours.self_attn.kv_b_proj.weight, before.self_attn.kv_b_proj.weight)
            assert torch.equal(ours.self_attn.o_proj.weight, before.self_attn.o_proj.weight)
    assert report.check["passed"]
    assert [note.split(" (")[0] for note in report.notes if note.startswith("stream refit")] == \
        [f"stream refit of {p}_proj" for p in projections]
    assert report.split == solved.split == 4.0  # a fixed split: the held-out windows serve the stream refit alone


def test_the_o_refit_moves_the_stream_after_attention_toward_the_original(gqa):
    """With ``o`` refit, each kept O projection is the one whose stream after the attention block is closest to
    the original's there on the held-out windows: re-measured here from the stock models, the error at that point
    is what the fit reports."""
    fields = dict(calibration=CALIB, kv_ratio=0.6, rope_dims=8, progress=False, split=4.0)
    mla, report = to_mla(gqa, MlaConfig(stream_refit=("o",), **fields))
    held = CALIB[-4:]
    first = report.layers[0].stream["o"]
    streams = []
    for model in (gqa, mla):
        seen = []
        hook = model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].double()))
        with torch.no_grad():
            model(input_ids=held)
        hook.remove()
        streams.append(seen[0])
    error = float((streams[1] - streams[0]).square().sum() / streams[0].square().sum())
    assert error == pytest.approx(first.after if first.kept else first.before, rel=1e-3)


@pytest.mark.parametrize("bad", [("up",), ("down", "down")])
def test_the_stream_refit_names_each_projection_it_knows_once(gqa, bad):
    with pytest.raises(CloverError, match="--stream-refit .*: name each of o, down at most once"):
        to_mla(gqa, MlaConfig(stream_refit=bad, calibration=CALIB, progress=False))


def test_the_stream_refit_has_no_place_in_the_gqa_layout(gqa):
    with pytest.raises(CloverError, match="refits the layers around MLA blocks"):
        to_mla(gqa, MlaConfig(layout="gqa", stream_refit=("down",), calibration=CALIB, progress=False))


def test_the_stream_refit_needs_held_out_windows_beyond_the_ones_it_fits_on(gqa):
    with pytest.raises(CloverError, match="whether a refit is kept needs 4 held-out calibration windows"):
        to_mla(gqa, MlaConfig(stream_refit=("o", "down"), split=4.0, calibration=CALIB[:4], progress=False))
