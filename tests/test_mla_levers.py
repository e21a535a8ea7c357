"""The MLA conversion's rotary levers (issue 23): which component is the shared rotated key, what the unrotated
components keep, partial RoPE, TransMLA's balanced latent. Every setting must still give a stock DeepSeek-V3 model
that computes clover's reference of the converted function; the attention statistics and the refit are checked
against their definitions."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from clover.errors import CloverError
from clover.mla import MlaConfig, to_mla
from clover.mla.attention import distance_phase, original_attention
from clover.mla.solve import nope_dims

CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
INPUTS = {"input_ids": torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1)), "use_cache": False}


@pytest.fixture(scope="module")
def gqa():
    return tiny_llama(vocab_size=300, num_key_value_heads=2)


@pytest.mark.parametrize("fields", [
    dict(rope_key="pca"), dict(rope_key="attention"), dict(unrotated="expected"), dict(unrotated="refit"),
    dict(rope_key="attention", unrotated="refit", rope_dims=8), dict(rope_dims=4, kv_ratio=0.5),
    dict(rope_dims=6, kv_ratio=0.5), dict(rope_dims=8, rope_frequencies="spread", kv_ratio=0.5),
    dict(rope_key="pca", latent_weights="bkv", split=1.0, kv_ratio=0.5),
    dict(rope_key="pca", latent_weights="bkv", split=1.0, freqfold=2, unrotated="nope"),
    dict(freqfold=4, kv_ratio=0.5, unrotated="nope"), dict(unrotated="nope"),
    dict(unrotated="refit", o_refit=True, kv_ratio=0.5), dict(value_moment="mixed", rope_dims=8, kv_ratio=0.6),
])
def test_every_lever_gives_the_stock_model_of_its_function(gqa, fields):
    mla, report = to_mla(gqa, MlaConfig(calibration=CALIB, progress=False, **fields))
    assert report.check["passed"]  # to_mla raises if the stock model left clover's reference; the report says so
    rope = fields.get("rope_dims", 16)
    assert mla.config.qk_rope_head_dim == report.qk_rope_head_dim == rope
    assert report.qk_nope_head_dim == nope_dims(2, 16, rope) == 2 * 16 - rope
    assert report.kv_bytes_per_token_after == 2 * (report.kv_lora_rank + rope) * 4  # 2 layers, float32
    assert (report.rope_key, report.unrotated) == (fields.get("rope_key", "query"), fields.get("unrotated", "refit"))


def test_the_format_holding_the_model_stays_exact_whatever_the_levers():
    """One KV head and every frequency rotated: nothing is unrotated, so no lever may change the function."""
    mqa = tiny_llama(vocab_size=300, num_key_value_heads=1)
    from clover.verify import model_outputs

    want = model_outputs(mqa, INPUTS)
    for fields in (dict(rope_key="attention", unrotated="refit"), dict(rope_key="pca", unrotated="expected")):
        mla, _ = to_mla(mqa, MlaConfig(calibration=CALIB, split=1.0, progress=False, **fields))
        got = model_outputs(mla, INPUTS)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_freqfold_turns_mixed_frequencies_at_one_and_so_is_not_exact():
    """TransMLA's FreqFold mixes neighbouring frequencies in one rotated component: even where the format could
    hold the model exactly (one KV head), its output moves. The peer row measures that cost."""
    mqa = tiny_llama(vocab_size=300, num_key_value_heads=1)
    from clover.verify import model_outputs

    want = model_outputs(mqa, INPUTS)
    mla, _ = to_mla(mqa, MlaConfig(calibration=CALIB, split=1.0, rope_key="pca", freqfold=2, unrotated="nope",
                                   progress=False))
    assert float((model_outputs(mla, INPUTS) - want).abs().max() / want.abs().max()) > 1e-4


def test_partial_rope_with_one_kv_head_leaves_only_the_dropped_frequencies_unrotated():
    mqa = tiny_llama(vocab_size=300, num_key_value_heads=1)
    _, report = to_mla(mqa, MlaConfig(calibration=CALIB, split=1.0, rope_dims=8, progress=False))
    assert report.qk_nope_head_dim == 8 and report.full_rank == 8 + 16
    assert all(0 < layer.rope_energy < 1 for layer in report.layers)


@pytest.mark.parametrize("how,kept", [("fastest", [0, 1, 2]), ("spread", [0, 2, 4, 6]), ("spread", [0, 4]),
                                      ("fastest", list(range(8)))])
def test_the_stock_rotary_embedding_turns_exactly_the_kept_original_frequencies(gqa, how, kept):
    """The format rotates its rope dims by its own theta: the conversion writes the theta under which those are the
    original frequencies it kept rotated (the fastest ones, or every (d / rope_dims)-th), so the engine computes
    them, not neighbours of them."""
    from clover.mla.solve import engine_theta, rotated_frequencies

    mla, _ = to_mla(gqa, MlaConfig(calibration=CALIB, rope_dims=2 * len(kept), rope_frequencies=how, split=1.0,
                                   progress=False))
    assert rotated_frequencies(16, 2 * len(kept), how).tolist() == kept
    want = gqa.model.rotary_emb.inv_freq.double()[kept]
    got = mla.model.rotary_emb.inv_freq.double()
    assert float((got - want).abs().max() / want.max()) < 1e-6
    with pytest.raises(ValueError, match="do not step evenly"):
        engine_theta(1e4, torch.tensor([0, 1, 3]), 16)


def test_expected_phase_is_the_attention_weighted_mean_rotation():
    g = torch.Generator().manual_seed(3)
    t, heads = 7, 2
    attn = torch.rand(heads, t, t, generator=g, dtype=torch.float64).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    inv_freq = torch.tensor([1.0, 0.3, 0.01], dtype=torch.float64)
    want = torch.zeros(heads, 3, dtype=torch.complex128)
    for m in range(t):
        for n in range(m + 1):
            want += attn[:, m, n, None] * torch.exp(1j * inv_freq * (m - n))
    got = distance_phase(attn, inv_freq)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-12


def test_original_attention_matches_the_model():
    """The statistics read the original attention: it must be the model's own (rotate-half RoPE, 1/sqrt(d))."""
    model = tiny_llama(vocab_size=300, num_key_value_heads=2)
    captured = {}
    attn_module = model.model.layers[0].self_attn
    def keep(module, args):
        captured["x"] = args[0][0].double()

    handle = attn_module.q_proj.register_forward_pre_hook(keep)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(INPUTS["input_ids"][:1], output_attentions=True, use_cache=False)
    handle.remove()
    q, k = attn_module.q_proj.weight.double().T, attn_module.k_proj.weight.double().T
    inv_freq = model.model.rotary_emb.inv_freq.double()
    got = original_attention(captured["x"], q, k, 4, 2, 16, inv_freq)
    want = out.attentions[0][0].double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5  # float32 model against float64 statistics


@pytest.mark.parametrize("fields,message", [
    (dict(rope_dims=6, rope_frequencies="spread"), "must divide the head width"),
    (dict(rope_dims=20), "wider than the head"),
    (dict(rope_frequencies="slowest"), "unknown --rope-frequencies"),
    (dict(rope_dims=3), "positive even number"),
    (dict(rope_key="random"), "unknown --rope-key"),
    (dict(unrotated="zero"), "unknown --unrotated"),
    (dict(layout="gqa", rope_dims=8), "--layout gqa sets the cache"),
    (dict(kv_ratio=0.9, rope_dims=16), "no more than the shared rotated key"),
    (dict(freqfold=3, unrotated="nope"), "must divide the head's 8 rotary frequencies"),
    (dict(freqfold=2), "TransMLA's recipe"),
    (dict(value_moment="output"), "unknown --value-moment"),
    (dict(value_moment="mixed", latent_weights="bkv"), "runs with --latent-weights clover"),
    (dict(split="best"), "use auto, layer or a positive number"),
    (dict(local_steps=-1), "use steps >= 0"),
    (dict(local_steps=5, local_lr=0.0), "a positive lr"),
    (dict(layout="gqa", local_steps=5), "refits MLA blocks"),
    (dict(local_inputs="model"), "unknown --local-inputs"),
    (dict(local_inputs="converted"), "add --local-steps N"),
])
def test_bad_lever_settings_are_refused(gqa, fields, message):
    with pytest.raises(CloverError, match=message):
        config = MlaConfig(calibration=CALIB, progress=False, **fields)
        config.check()
        config.check_against(gqa.config)


def test_the_refit_scores_closer_to_the_original_than_nope_or_expected(gqa):
    """On the windows it is fitted to, the least-squares factor has the smallest weighted score error of the three
    (it minimises that error; the ridge towards 1 is a 1e-6 relative nudge)."""
    from clover import calibrate
    from clover.adapters import adapter_for
    from clover.mla import attention, rotation
    from clover.mla.solve import RotarySettings, rotary_maps

    adapter = adapter_for(gqa)
    site = adapter.sites(gqa)[1]
    inv_freq = gqa.model.rotary_emb.inv_freq.double()
    seen = attention.collect(gqa, adapter, [site], CALIB, inv_freq, keep=2, progress=False)[0]
    cov = calibrate.collect(gqa, adapter, [site], CALIB, progress=False).sites[site.name].q_input[:-1, :-1].double()
    w = adapter.read(site)
    q, k = w.q.weight.double().T, w.k.weight.double().T
    _, p, c, rotated = rotary_maps(q, k, cov, 4, 2, 16, RotarySettings(rope_dims=8), seen)
    fit = rotation.score_fit(seen, q, k, p, c, ~rotated, 4, 2, 16, inv_freq)
    errors = {name: rotation.score_error(fit, alpha) for name, alpha in (
        ("nope", torch.ones(4, 8, dtype=torch.complex128)), ("expected", seen.phase),
        ("refit", rotation.refit(fit)))}
    scale = fit[2]  # the weighted energy of the unrotated score terms
    assert (errors["refit"] <= errors["nope"] + 1e-6 * scale).all()
    assert (errors["refit"] <= errors["expected"] + 1e-6 * scale).all()
    assert (errors["refit"] < 0.999 * errors["nope"]).any()  # and it does move: the fit is not the identity


def test_o_refit_changes_nothing_where_the_latent_holds_the_values(gqa):
    """At full rank the latent's values are the original's, so the least-squares O is the original O."""
    from clover.verify import model_outputs

    plain, _ = to_mla(gqa, MlaConfig(calibration=CALIB, split=1.0, o_refit=False, progress=False))
    refit, _ = to_mla(gqa, MlaConfig(calibration=CALIB, split=1.0, o_refit=True, progress=False))
    want = model_outputs(plain, INPUTS)
    assert float((model_outputs(refit, INPUTS) - want).abs().max() / want.abs().max()) < 1e-5


def test_joint_lowrank_keeps_the_svd_under_one_moment_and_is_stationary_under_two():
    from clover.lowrank import joint_lowrank, sym_sqrt, weighted_lowrank

    g = torch.Generator().manual_seed(0)

    def spd(n):
        a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
        return a @ a.T / (2 * n)

    first, second = (torch.randn(30, n, generator=g, dtype=torch.float64) for n in (8, 12))
    cov_first, cov_second, weight_first, weight_second = spd(30), spd(30), spd(8), spd(12)
    root = torch.block_diag(sym_sqrt(weight_first)[0], sym_sqrt(weight_second)[0])
    chol = torch.linalg.cholesky(cov_first)
    svd = weighted_lowrank(torch.cat([first, second], 1), chol, root, torch.linalg.inv(root))
    down, _ = svd.truncate(5)
    same = joint_lowrank(first, second, chol, cov_first, weight_first, weight_second, down)
    optimum = float(svd.s[5:].square().sum())  # the SVD is the global optimum under one moment
    assert abs(same.error - optimum) <= 1e-9 * same.total
    start = joint_lowrank(first, second, chol, cov_second, weight_first, weight_second, down, iterations=0)
    two = joint_lowrank(first, second, chol, cov_second, weight_first, weight_second, down, iterations=500,
                        tol=1e-13)
    assert two.error < 0.95 * start.error and two.total == start.total
    a = two.down.clone().requires_grad_(True)
    up_1, up_2 = two.up[:, :8], two.up[:, 8:]
    loss = sum(((c @ (x - a @ u)) * ((x - a @ u) @ w)).sum() for c, x, u, w in (
        (cov_first, first, up_1, weight_first), (cov_second, second, up_2, weight_second)))
    loss.backward()
    assert float(a.grad.norm()) < 1e-4 * float(loss) / float(a.detach().norm())  # a stationary point in down


def test_mixed_value_pricing_lowers_the_joint_error_it_is_solved_for(gqa):
    """Values priced by the attention-mixed inputs: the joint latent refined from the input-priced one has a smaller
    error under the mixed pricing (keys by the input moment, values by the mixed one) than its start."""
    from dataclasses import fields

    from clover import calibrate
    from clover.adapters import adapter_for
    from clover.mla import attention
    from clover.mla.convert import _layer_parts
    from clover.mla.solve import RotarySettings, latent_layer

    adapter = adapter_for(gqa)
    site = adapter.sites(gqa)[1]
    inv_freq = gqa.model.rotary_emb.inv_freq.double()
    seen = attention.collect(gqa, adapter, [site], CALIB, inv_freq, keep=2, progress=False, mixed=True)[0]
    moment = calibrate.collect(gqa, adapter, [site], CALIB, inputs=True, progress=False).sites[site.name].q_input
    config = MlaConfig(calibration=CALIB, rope_dims=8, kv_ratio=0.6, split=1.0, value_moment="mixed")
    mixed = _layer_parts(adapter, site, moment, torch.float64,
                         RotarySettings(**{f.name: getattr(config, f.name) for f in fields(RotarySettings)}), seen,
                         inv_freq)
    plain = _layer_parts(adapter, site, moment, torch.float64, RotarySettings(rope_dims=8, o_refit=True), seen,
                         inv_freq)
    rank = config.kv_lora_rank(2, 16)
    n_nope = mixed.q_nope.shape[-1]

    def joint_error(layer):  # keys by the input moment, values by the (scaled) mixed one, both weighted as solved
        z = layer.down
        keys = mixed.target[:, :n_nope] - z @ layer.up_k
        values = mixed.target[:, n_nope:] - z @ torch.cat(list(layer.up_v), dim=1)
        cov = mixed.chol @ mixed.chol.mT
        return float(((cov @ keys) * (keys @ mixed.key_root @ mixed.key_root)).sum()
                     + ((mixed.value_moment @ values) * (values @ mixed.value_root @ mixed.value_root)).sum())

    solved, start = latent_layer(mixed, rank, 1.0), latent_layer(plain, rank, 1.0)
    assert joint_error(solved) < 0.999 * joint_error(start)
    assert 0 < solved.kept_energy < 1


def test_a_split_per_layer_is_chosen_on_held_out_windows_and_is_what_the_model_computes(gqa):
    """``split="layer"`` starts from the one split ``auto`` chooses and lets each layer keep another grid value
    where the held-out loss falls. The loss it reports is the returned model's own on the held-out windows (the
    in-place trials left nothing behind), below the one split's here, where the layers choose differently."""
    from clover import heldout
    from clover.adapters import adapter_for

    fields = dict(calibration=CALIB, kv_ratio=0.5, rope_dims=8, progress=False)
    _, one = to_mla(gqa, MlaConfig(**fields))
    mla, per = to_mla(gqa, MlaConfig(split="layer", **fields))
    splits = [layer.split for layer in per.layers]
    assert per.split == one.split and set(splits) <= {0.25, 1.0, 4.0, 16.0}
    assert len(set(splits)) > 1  # this model's layers want different splits (so the search is exercised)
    assert per.split_losses["layer"] < one.split_losses[f"{one.split:g}"]
    measured = heldout.Reference(gqa, adapter_for(gqa), CALIB[-4:]).loss(mla)
    assert measured == pytest.approx(per.split_losses["layer"], rel=1e-5)
    assert per.check["passed"] and all(layer.split == one.split for layer in one.layers)


def test_the_loss_from_a_layer_on_is_the_whole_models_loss(gqa):
    """``heldout.FromLayer`` runs only the layers from ``start`` on (the per-layer search's trials): its loss must be
    the full forward's, for every start, after ``advance`` past settled layers, and after a later layer is rewritten,
    so the search's choices are the ones full passes would make."""
    from clover import heldout
    from clover.adapters import adapter_for

    mla, _ = to_mla(gqa, MlaConfig(calibration=CALIB, kv_ratio=0.5, rope_dims=8, progress=False))
    reference = heldout.Reference(gqa, adapter_for(gqa), CALIB[-4:])
    count = len(mla.model.layers)
    tails = [heldout.FromLayer(reference, mla, start) for start in range(count)]
    whole = reference.loss(mla)
    assert whole > 0 and all(tail.loss() == pytest.approx(whole, rel=1e-6) for tail in tails)
    walker = heldout.FromLayer(reference, mla, 0)
    for start in range(count):
        assert walker.start == start and walker.loss() == pytest.approx(whole, rel=1e-6)
        if start < count - 1:
            walker.advance()  # settles every layer but the last, which the rewrite below changes
    last = mla.model.layers[-1].self_attn.kv_b_proj.weight
    with torch.no_grad():
        last.mul_(1.5)  # a rewrite of the last layer: every tail, started before or at it, sees it
    moved = reference.loss(mla)
    assert abs(moved - whole) > 1e-3 * whole
    assert all(tail.loss() == pytest.approx(moved, rel=1e-6) for tail in [*tails, walker])
    walker.advance()
    assert walker.loss() == pytest.approx(moved, rel=1e-6)  # only the final norm and the head are left
    with pytest.raises(ValueError, match="settled already"):
        walker.advance()


def test_the_layer_wise_refit_keeps_only_what_lowers_the_held_out_error_and_stays_the_stock_function(gqa):
    """``local_steps``: each block is refit to the original block's output and kept only where its held-out error
    fell; the stock model still computes clover's reference of what was kept, and on this model the whole model's
    held-out loss falls below the solve's (the same windows hold out in both conversions)."""
    from clover import heldout
    from clover.adapters import adapter_for

    fields = dict(calibration=CALIB, kv_ratio=0.6, rope_dims=8, progress=False)
    plain, solved = to_mla(gqa, MlaConfig(**fields))
    mla, refit = to_mla(gqa, MlaConfig(local_steps=40, **fields))
    fits = [layer.local for layer in refit.layers]
    assert all(solved_layer.local is None for solved_layer in solved.layers)
    assert all(fit.kept == (fit.after < fit.before) for fit in fits) and any(fit.kept for fit in fits)
    assert refit.check["passed"] and any("layer-wise refit" in note for note in refit.notes)
    reference = heldout.Reference(gqa, adapter_for(gqa), CALIB[-4:])
    assert reference.loss(mla) < reference.loss(plain)


def test_the_converted_stream_feeds_each_block_what_the_converted_model_does(gqa, monkeypatch):
    """``local.ConvertedStream``: block i's inputs, after advancing through blocks 0..i-1 with other maps, are the
    attention inputs of clover's reference model holding those maps (hooked in its full forward)."""
    from clover.adapters import adapter_for
    from clover.mla import convert, local
    from clover.mla.reference import reference_model

    solved = []  # each conversion's solved layers, as to_mla hands them to its verification
    verify = convert.verify
    monkeypatch.setattr(convert, "verify", lambda model, mla, layers, head_dim, adapter, mlp_down: (
        solved.append(layers), verify(model, mla, layers, head_dim, adapter, mlp_down))[1])
    for kv_ratio in (0.6, 0.3):
        to_mla(gqa, MlaConfig(calibration=CALIB, kv_ratio=kv_ratio, rope_dims=8, progress=False))
    layers, other = solved
    adapter = adapter_for(gqa)
    stream = local.ConvertedStream(gqa, adapter, layers, 16, CALIB[:3])
    last = len(layers) - 1
    for i in range(last):
        stream.advance(i, other[i])
    twin = reference_model(gqa, other[:last] + layers[last:], 16)
    seen = []
    hook = twin.model.layers[last].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        for row in CALIB[:3]:
            twin(**adapter.calibration_inputs(twin, row[None]))
    hook.remove()
    want, got = torch.cat(seen), stream.inputs(last)
    assert got.shape == want.shape and float((got - want).abs().max() / want.abs().max()) < 1e-6
    control = local.ConvertedStream(gqa, adapter, layers, 16, CALIB[:3])  # the earlier blocks' maps matter
    for i in range(last):
        control.advance(i, layers[i])
    assert float((control.inputs(last) - got).abs().max() / want.abs().max()) > 1e-3


def test_the_refit_on_converted_inputs_reads_them_first_to_last_and_keeps_only_what_helps(gqa):
    """``local_inputs="converted"``: the first block reads the same inputs either way, so its refit is the same;
    later blocks start from the converted model's inputs; each keeps its refit iff its held-out error fell, and the
    stock model still computes clover's reference."""
    fields = dict(calibration=CALIB, kv_ratio=0.6, rope_dims=8, progress=False, local_steps=40)
    _, independent = to_mla(gqa, MlaConfig(**fields))
    _, converted = to_mla(gqa, MlaConfig(local_inputs="converted", **fields))
    ours, theirs = [layer.local for layer in converted.layers], [layer.local for layer in independent.layers]
    assert ours[0].before == pytest.approx(theirs[0].before, rel=1e-6)
    assert ours[0].after == pytest.approx(theirs[0].after, rel=1e-4)
    assert ours[-1].before != pytest.approx(theirs[-1].before, rel=1e-3)  # upstream error reaches the last block
    assert all(fit.kept == (fit.after < fit.before) for fit in ours) and any(fit.kept for fit in ours)
    assert converted.check["passed"] and any("converted model's attention inputs" in n for n in converted.notes)


def test_a_residual_target_adds_the_stream_entering_each_layer_to_the_block_output(gqa):
    """``block_data(residual=True)``: each block's target is the o projection's output plus the residual stream
    entering its decoder layer (before the norm), as the model's own forward carries it there."""
    from clover import heldout
    from clover.adapters import adapter_for
    from clover.mla import local

    adapter = adapter_for(gqa)
    sites = adapter.sites(gqa)
    plain = local.block_data(gqa, adapter, sites, CALIB[:3], progress=False)
    residual = local.block_data(gqa, adapter, sites, CALIB[:3], progress=False, inputs=False, residual=True)
    assert residual[0].inputs is None
    for i, (mine, theirs) in enumerate(zip(residual, plain, strict=True)):
        stream = torch.cat([hidden.float() for hidden, _ in heldout.entering(
            gqa, i, (adapter.calibration_inputs(gqa, row[None]) for row in CALIB[:3]))])
        want = theirs.outputs + stream
        assert float((mine.outputs - want).abs().max() / want.abs().max()) < 1e-6
        assert float(stream.abs().max()) > float(theirs.outputs.abs().max()) * 1e-2  # the stream is no rounding


def test_the_refit_toward_the_residual_stream_makes_up_the_upstream_error(gqa):
    """``local_inputs="residual"``: the first block has no upstream error (both models embed the same), so its
    target and refit are those of ``"converted"``; the last block's target carries the error the blocks before it
    left in the stream, so its starting error differs; each block keeps its refit iff its held-out error fell, and
    the stock model still computes clover's reference."""
    fields = dict(calibration=CALIB, kv_ratio=0.6, rope_dims=8, progress=False, local_steps=40)
    _, converted = to_mla(gqa, MlaConfig(local_inputs="converted", **fields))
    _, residual = to_mla(gqa, MlaConfig(local_inputs="residual", **fields))
    ours, theirs = [layer.local for layer in residual.layers], [layer.local for layer in converted.layers]
    assert ours[0].before == pytest.approx(theirs[0].before, rel=1e-6)
    assert ours[0].after == pytest.approx(theirs[0].after, rel=1e-4)
    assert ours[-1].before != pytest.approx(theirs[-1].before, rel=1e-3)
    assert all(fit.kept == (fit.after < fit.before) for fit in ours)
    assert residual.check["passed"] and any("toward the original residual stream" in n for n in residual.notes)


def test_the_command_takes_the_levers_and_refuses_bad_ones(tmp_path):
    import json

    from tiny_tokenizer import tiny_tokenizer
    from typer.testing import CliRunner

    from clover.cli import app

    runner = CliRunner()
    folder = tmp_path / "llama"
    tiny_llama(vocab_size=300, num_key_value_heads=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = runner.invoke(app, ["mla", str(folder), "--out", str(tmp_path / "out"), "--kv-ratio", "0.5",
                                 "--rope-key", "attention", "--unrotated", "refit", "--rope-dims", "8", "--o-refit",
                                 "--value-moment", "mixed", "--split", "layer", "--local-steps", "5",
                                 "--local-inputs", "converted", "--stream-refit", "o, down",
                                 "--calib-samples", "6", "--calib-seqlen", "32", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["rope_key"], report["unrotated"], report["qk_rope_head_dim"]) == ("attention", "refit", 8)
    assert report["value_moment"] == "mixed" and "layer" in report["split_losses"]
    assert all(layer["split"] in (0.25, 1, 4, 16) for layer in report["layers"])
    assert all(set(layer["local"]) == {"before", "after", "kept"} for layer in report["layers"])
    assert all(list(layer["stream"]) == ["o", "down"] for layer in report["layers"])
    assert all(set(fit) == {"before", "after", "kept", "ridge"} for layer in report["layers"]
               for fit in layer["stream"].values())
    assert any("converted model's attention inputs" in note for note in report["notes"])
    assert report["kv_lora_rank"] == 32 - 8  # half of 2 x 2 x 16, less the 8 rotated dims
    result = runner.invoke(app, ["mla", str(folder), "--out", str(tmp_path / "x"), "--freqfold", "2",
                                 "--unrotated", "expected"])
    assert result.exit_code == 2 and "TransMLA's recipe" in result.output and not (tmp_path / "x").exists()
    result = runner.invoke(app, ["mla", str(folder), "--out", str(tmp_path / "y"), "--stream-refit", "o,up"])
    assert result.exit_code == 2 and "--stream-refit o,up" in result.output and not (tmp_path / "y").exists()
