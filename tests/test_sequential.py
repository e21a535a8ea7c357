"""Sequential calibration: layer i is measured with layers 0..i-1 already pruned, and nothing else changes."""

import copy
import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from clover import calibrate
from clover.adapters import adapter_for
from clover.criteria import candidate
from clover.errors import CloverError
from clover.pairs import cast_like, with_factors
from clover.prune import PruneConfig, prune
from clover.save import save_model
from clover.sequential import masked
from clover.streaming import stream_prune
from clover.verify import model_outputs

CALIB = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
INPUTS = {"input_ids": torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))}
NEEDS = dict(inputs=True, head_outputs=True, channels=True)


def _config(**kw):
    settings = dict(criterion="whitened", qk_criterion="rotary-activation", qk_ratio=0.5, vo_ratio=0.5,
                    calibration=CALIB, progress=False)
    if "vo_threshold" in kw:  # a threshold replaces the pair's ratio (giving both is an error)
        settings["vo_ratio"] = 0.0
    return PruneConfig(**{**settings, **kw})


def _mask_layer(model, site, stats):
    """Write ``site``'s half-pruned pairs into ``model`` at full width (dropped columns zero); return the factors.

    Half of the units: 4 of 8 rotary frequency pairs, 8 of 16 V-O directions."""
    adapter = adapter_for(model)
    w = adapter.read(site)
    new, kept = w, {}
    for kind, crit in (("qk", "rotary-activation"), ("vo", "whitened")):
        c = candidate(w, kind, crit, rotary=site.rotary, name=site.name, stats=stats, vo_whitening="mixed")
        kept[kind] = c.truncate(c.units // 2)
        new = with_factors(new, kind, *masked(c, c.units // 2))
    adapter.write(site, cast_like(new, w))
    return kept


def test_zero_masked_full_width_layers_compute_the_physically_pruned_model():
    """What the working copy runs is exactly what the smaller saved model runs (rotary pairs stay in place)."""
    model = tiny_llama(num_key_value_heads=2, attention_bias=True)
    pruned, _ = prune(model, _config())
    work = copy.deepcopy(model)
    adapter = adapter_for(work)
    sites = adapter.sites(work)
    stats = calibrate.collect(model, adapter_for(model), adapter_for(model).sites(model), CALIB, **NEEDS,
                              progress=False).sites
    for site in sites:
        _mask_layer(work, site, stats[site.name])
    want = model_outputs(pruned, INPUTS)
    assert (model_outputs(work, INPUTS) - want).abs().max() <= 1e-5 * want.abs().max()


def test_each_layer_is_measured_after_the_earlier_layers_are_pruned():
    model = tiny_llama(num_key_value_heads=2, attention_bias=True)
    sequential, _ = prune(model, _config(sequential=True))
    one_shot, _ = prune(model, _config())

    # By hand: layer 0 from the original statistics, then layer 1 from statistics of the layer-0-pruned model.
    work = copy.deepcopy(model)
    adapter = adapter_for(work)
    site0, site1 = adapter.sites(work)
    stats0 = calibrate.collect(work, adapter, [site0], CALIB, **NEEDS, progress=False).sites[site0.name]
    _mask_layer(work, site0, stats0)
    stats1 = calibrate.collect(work, adapter, [site1], CALIB, **NEEDS, progress=False).sites[site1.name]
    expected1 = _mask_layer(copy.deepcopy(work), adapter.sites(work)[1], stats1)

    seq_adapter = adapter_for(sequential)
    seq0, seq1 = (seq_adapter.read(s) for s in seq_adapter.sites(sequential))
    one0, one1 = (adapter_for(one_shot).read(s) for s in adapter_for(one_shot).sites(one_shot))
    assert torch.equal(seq0.v.weight, one0.v.weight) and torch.equal(seq0.o.weight, one0.o.weight)
    assert not torch.allclose(seq1.o.weight, one1.o.weight)  # layer 1 really saw other inputs
    got_o = seq1.o.weight.double()
    want_o = expected1["vo"][0].reshape(4, 64, 8).permute(1, 0, 2).reshape(64, 32)  # (G, r*D, k) -> O (D, H*k)
    assert torch.allclose(got_o, want_o, rtol=1e-4, atol=1e-6)


def test_sequential_on_gpt2_prunes_both_pairs():
    model = tiny_gpt2(n_layer=3)
    pruned, report = prune(model, PruneConfig(criterion="whitened", qk_ratio=0.5, vo_ratio=0.25, calibration=CALIB,
                                              progress=False, sequential=True))
    assert [(lr.qk_dim, lr.vo_dim) for lr in report.layers] == [(8, 12)] * 3
    assert report.calibration_tokens == CALIB.numel()
    assert torch.isfinite(model_outputs(pruned, INPUTS)).all()


@pytest.mark.parametrize("thresholds", [{}, {"vo_threshold": 0.01}], ids=["ratios", "one pair by threshold"])
def test_global_allocation_with_sequential_is_refused(thresholds):
    """Any pair still ranked by a global ratio is refused, even when the other pair uses a threshold."""
    with pytest.raises(CloverError, match="allocation uniform"):
        prune(tiny_llama(), _config(sequential=True, allocation="global", **thresholds))


def test_global_allocation_is_moot_when_every_pair_uses_a_threshold():
    _, report = prune(tiny_gpt2(), PruneConfig(criterion="whitened", qk_threshold=1e-9, vo_threshold=1e-9,
                                               allocation="global", calibration=CALIB, progress=False,
                                               sequential=True))
    assert all((lr.qk_dim, lr.vo_dim) == (16, 16) for lr in report.layers)


def test_two_stacks_are_refused():
    from test_whisper import tiny_whisper

    with pytest.raises(CloverError, match="single stack"):
        prune(tiny_whisper(), PruneConfig(criterion="whitened", vo_ratio=0.5, calibration=CALIB[:, :16],
                                          progress=False, sequential=True))


def test_sequential_without_data_aware_criterion_says_it_does_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune(tiny_gpt2(), PruneConfig(criterion="clover", vo_ratio=0.5, progress=False, sequential=True))
    assert any("no effect" in str(w.message) for w in caught)


def test_streamed_prune_refuses_sequential_and_writes_nothing(tmp_path):
    source = tmp_path / "src"
    save_model(tiny_llama(), None, source)
    out = tmp_path / "out"
    with pytest.raises(CloverError, match="--no-stream"):
        stream_prune(source, out, _config(sequential=True))
    assert not out.exists()
