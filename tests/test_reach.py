"""Projecting a tuned MLA conversion onto CLOVER's cores: a change the cores made comes back whole, any other is
cut to its least-squares fit (weighted by the inputs' second moments when given), and targets without a core fit
are refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

from clover.errors import CloverError
from clover.finetune import TuneConfig, attach, merge_
from clover.finetune.attach import is_attached
from clover.finetune.reach import _solve, input_moments, project_
from clover.mla import MlaConfig, to_mla

CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
TARGETS = ("qk", "vo", "rope", "up")


@pytest.fixture(scope="module")
def mla():
    """An MLA conversion at KV 50% of a tiny LLaMA with two KV heads (a 16-dim latent)."""
    return to_mla(tiny_llama(vocab_size=300, num_key_value_heads=2),
                  MlaConfig(kv_ratio=0.5, calibration=CALIB, progress=False))[0]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).detach().norm()) <= tol * float(b.detach().norm())


def tuned_by_cores(model, seed: int = 0):
    """A copy of ``model`` with every CLOVER core moved at random, merged."""
    out = copy.deepcopy(model)
    attach(out, TuneConfig(targets=TARGETS, verify=False, progress=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.requires_grad:
                p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=g))
    merge_(out, verify=False)
    return out


@pytest.mark.parametrize("weighted", [False, True])
def test_a_change_the_cores_made_comes_back_whole(mla, weighted):
    tuned = tuned_by_cores(mla)
    moments = input_moments(mla, CALIB, TARGETS) if weighted else None
    projected = copy.deepcopy(mla)
    report = project_(projected, tuned, TARGETS, moments)
    assert set(report.outside) == set(TARGETS) and report.weighted == weighted
    assert all(report.changed[t] > 0 for t in TARGETS)  # every target did move
    assert max(report.outside.values()) < 1e-8, report.outside
    mine, theirs = dict(projected.named_parameters()), dict(tuned.named_parameters())
    assert all(close(mine[n], theirs[n]) for n in theirs), [n for n in theirs if not close(mine[n], theirs[n])]
    assert not is_attached(projected)


def test_a_change_outside_is_cut_to_the_row_space_it_may_use(mla):
    """An up block ``P C Q^T`` (d x D) can only read the d input directions of ``Q``: the unweighted fit of a
    random change is its projection onto them, and what is left is the reported share."""
    tuned = copy.deepcopy(mla)
    g = torch.Generator().manual_seed(1)
    ups = [n for n, _ in tuned.named_modules() if n.endswith("mlp.up_proj")]
    deltas = {}
    with torch.no_grad():
        for name in ups:
            weight = tuned.get_submodule(name).weight
            deltas[name] = 0.1 * weight.abs().mean() * torch.randn(weight.shape, generator=g)
            weight.add_(deltas[name])
    projected = copy.deepcopy(mla)
    report = project_(projected, tuned, ("up",))
    block = mla.config.hidden_size // mla.config.num_attention_heads
    kept = removed = 0.0
    for name in ups:
        w0 = mla.get_submodule(name).weight.double()
        blocks = w0.reshape(-1, block, w0.shape[1])
        _, _, vh = torch.linalg.svd(blocks, full_matrices=False)  # (n, d, D): each block's input directions
        delta = deltas[name].double().reshape(blocks.shape)
        inside = delta @ vh.mT @ vh
        expected = (blocks + inside).reshape(w0.shape)
        assert close(projected.get_submodule(name).weight.double(), expected)
        kept += float(inside.pow(2).sum())
        removed += float((delta - inside).pow(2).sum())
    assert 0.5 < report.outside["up"] < 1  # a random change in a D-wide input space is mostly out of a d-wide one
    assert report.outside["up"] == pytest.approx(removed / (kept + removed), rel=1e-4)
    again = project_(copy.deepcopy(mla), projected, ("up",))  # the fit is inside: projecting it keeps it
    assert again.outside["up"] < 1e-8


def test_the_weighted_fit_solves_its_normal_equations():
    """``C`` minimises ``tr(A E B E^T)`` for ``E = T - P C Q^T``: the gradient ``P^T A E B Q`` is zero."""
    g = torch.Generator().manual_seed(2)
    p, q = torch.randn(3, 12, 4, generator=g), torch.randn(3, 9, 4, generator=g)
    target = torch.randn(3, 12, 9, generator=g)
    x, y = torch.randn(40, 12, generator=g), torch.randn(40, 9, generator=g)
    a, b = (x.T @ x / 40).double(), (y.T @ y / 40).double()
    core, residual = _solve(p, q, target, a, b)
    gradient = p.double().mT @ a @ residual @ b @ q.double()
    assert float(gradient.norm()) < 1e-9 * float((p.double().mT @ a @ target.double() @ b @ q.double()).norm())
    plain, _ = _solve(p, q, target)
    assert not close(core, plain, 1e-3)  # the weights do change the fit


def test_targets_without_a_core_fit_or_another_model_are_refused_before_anything_changes(mla):
    start = copy.deepcopy(mla)
    with pytest.raises(CloverError, match="no projection onto CLOVER cores"):
        project_(start, tuned_by_cores(mla), ("vo", "k"))
    other = to_mla(tiny_llama(vocab_size=300, num_key_value_heads=2),  # another latent width
                   MlaConfig(kv_ratio=0.25, calibration=CALIB, progress=False))[0]
    with pytest.raises(CloverError, match="not a tuning of the start model"):
        project_(start, other, TARGETS)
    assert not is_attached(start)
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), mla.parameters(), strict=True))
