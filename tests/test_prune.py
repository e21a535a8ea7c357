"""Pruning on tiny random models of every family: physically smaller, exact where it should be, and loadable."""

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import INIT, _build, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, MistralConfig, MistralForCausalLM

import clover  # noqa: F401  (registers the clover_* model types)
from clover.adapters import adapter_for
from clover.calibrate import cholesky_factor
from clover.errors import CloverError
from clover.pairs import factors
from clover.prune import PruneConfig, kv_bytes_per_token, prune
from clover.save import save_model
from clover.verify import model_outputs

CALIB = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
INPUTS = {"input_ids": torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))}

FAMILIES = {
    "gpt2": (tiny_gpt2, "clover", AutoModelForCausalLM),
    "llama": (lambda: tiny_llama(attention_bias=True), "rotary-weight", AutoModelForCausalLM),
    "bert": (tiny_bert, "clover", AutoModelForMaskedLM),
}


def _assert_same(got, want):
    """Same logits up to float32 rounding of a different thread schedule (saved weights are bit-identical)."""
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def _config(criterion, qk_criterion, **kw):
    return PruneConfig(criterion=criterion, qk_criterion=qk_criterion, calibration=CALIB, progress=False, **kw)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("criterion", ["vanilla", "clover", "whitened"])
def test_weights_and_kv_cache_really_shrink(family, criterion):
    build, qk_rotary, _ = FAMILIES[family]
    model = build()
    qk_criterion = qk_rotary if qk_rotary.startswith("rotary") else criterion
    pruned, report = prune(model, _config(criterion, qk_criterion, qk_ratio=0.5, vo_ratio=0.25))
    adapter = adapter_for(pruned)
    for site in adapter.sites(pruned):
        w = adapter.read(site)
        assert (w.qk_dim, w.vo_dim) == (8, 12)  # head_dim 16
        assert w.q.weight.shape[0] == site.num_heads * 8 and w.o.weight.shape[1] == site.num_heads * 12
    assert report.params_after < report.params_before
    assert report.kv_bytes_per_token_after / report.kv_bytes_per_token_before == pytest.approx(20 / 32)
    assert kv_bytes_per_token(pruned) == report.kv_bytes_per_token_after
    assert torch.isfinite(model_outputs(pruned, INPUTS)).all()
    # the input model is untouched
    assert adapter_for(model).read(adapter_for(model).sites(model)[0]).qk_dim == 16


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_zero_threshold_keeps_every_direction_and_is_exact(family):
    """CLOVER basis at full rank through the pruned runtime: same outputs as the original."""
    model = FAMILIES[family][0]()
    pruned, report = prune(model, _config("clover", None, qk_threshold=0.0, vo_threshold=0.0))
    assert all((lr.qk_dim, lr.vo_dim) == (16, 16) for lr in report.layers)
    ref = model_outputs(model, INPUTS)
    assert (model_outputs(pruned, INPUTS) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_clover_truncation_is_the_best_rank_k_product():
    model = tiny_gpt2()
    pruned, _ = prune(model, _config("clover", None, qk_ratio=0.25, vo_ratio=0.5))
    a, b = adapter_for(model), adapter_for(pruned)
    for site, new_site in zip(a.sites(model), b.sites(pruned), strict=True):
        for kind, keep in (("qk", 12), ("vo", 8)):
            left0, right0 = factors(a.read(site), kind)
            product = left0.double() @ right0.double().mT
            left, right = factors(b.read(new_site), kind)
            approx = left.double() @ right.double().mT
            s = torch.linalg.svdvals(product)
            best = s[:, keep:].pow(2).sum(-1).sqrt()
            assert torch.allclose(torch.linalg.matrix_norm(product - approx), best, rtol=1e-4, atol=1e-6)


def test_softmax_scale_is_the_original():
    model = tiny_llama()
    pruned, _ = prune(model, _config("clover", "rotary-weight", qk_ratio=0.5, vo_ratio=0.5))
    assert pruned.model.layers[0].self_attn.scaling == model.model.layers[0].self_attn.scaling == 16 ** -0.5


def test_rotary_pairs_equal_zeroing_those_channels_in_the_original():
    """Dropping frequency pairs must act exactly like zeroing both channels of those pairs in q and k."""
    model = tiny_llama(num_key_value_heads=2)
    pruned, report = prune(model, _config("clover", "rotary-activation", qk_ratio=0.5))
    reference = tiny_llama(num_key_value_heads=2)
    attn_ref = [layer.self_attn for layer in reference.model.layers]
    with torch.no_grad():
        for lr, attn in zip(report.layers, attn_ref, strict=True):
            assert lr.rope_pairs is not None and all(len(p) == 4 for p in lr.rope_pairs)
            for g, pairs in enumerate(lr.rope_pairs):
                dropped = [i for i in range(8) if i not in pairs]
                channels = dropped + [i + 8 for i in dropped]
                for head in range(g * 2, g * 2 + 2):
                    attn.q_proj.weight[[head * 16 + c for c in channels]] = 0
                attn.k_proj.weight[[g * 16 + c for c in channels]] = 0
    ref = model_outputs(reference, INPUTS)
    assert (model_outputs(pruned, INPUTS) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert any("not a CLOVER rewrite" in n for n in report.notes)


def test_generate_with_cache_matches_full_forward_on_rotary_pruned_llama():
    model = tiny_llama()
    pruned, _ = prune(model, _config("whitened", "rotary-activation", qk_ratio=0.5, vo_ratio=0.5))
    prompt = INPUTS["input_ids"][:1, :6]
    out = pruned.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    seq = prompt
    for _ in range(6):
        nxt = pruned(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_global_allocation_spends_one_budget():
    model = tiny_gpt2(n_layer=4)
    _, report = prune(model, _config("whitened", None, vo_ratio=0.5, allocation="global"))
    dims = [lr.vo_dim for lr in report.layers]
    assert sum(dims) == 4 * 16 // 2 and min(dims) >= 1
    assert report.allocation == "global"


def test_global_allocation_compares_shares_of_each_layer_not_raw_scores():
    """A layer whose outputs are 1000x larger must not keep everything: scores count as shares of their layer."""
    from clover.ranks import global_keeps

    class Scores:
        def __init__(self, values):
            self.scores = torch.tensor([values], dtype=torch.float64)
            self.units = len(values)

    flat, steep = [4.0, 3.0, 2.0, 1.0], [8.0, 1.2, 0.4, 0.4]
    assert global_keeps([Scores(flat), Scores([1000 * v for v in steep])], 0.5, "--vo-ratio") == [3, 1]


def test_threshold_keeps_directions_above_it():
    model = tiny_gpt2()
    site = adapter_for(model).sites(model)[0]
    from clover.decompose import spectrum

    s = spectrum(*factors(adapter_for(model).read(site), "vo"))
    t = float(s[:, 8].max()) * (1 + 1e-9)  # keeps exactly the 8 largest of the widest group
    _, report = prune(model, _config("clover", None, vo_threshold=t))
    assert report.layers[0].vo_dim == 8 and report.allocation == "threshold"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_and_load_round_trip(family, tmp_path):
    build, qk_rotary, auto = FAMILIES[family]
    model = build()
    pruned, report = prune(model, _config("whitened", qk_rotary if qk_rotary.startswith("rotary") else "whitened",
                                          qk_ratio=0.25, vo_ratio=0.5, allocation="global"))
    ref = model_outputs(pruned, INPUTS)
    save_model(pruned, None, tmp_path / "m", report=report.to_dict())
    loaded = auto.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(pruned)
    _assert_same(model_outputs(loaded, INPUTS), ref)
    base = AutoModel.from_pretrained(tmp_path / "m")
    assert base.config.model_type == f"clover_{family}"

    # Without clover: the modeling file written next to the weights is enough.
    script = (
        "import sys, torch; sys.modules['clover'] = None\n"
        f"from transformers import {auto.__name__} as A\n"
        f"m = A.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad(): out = m(**x).logits\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    torch.save(INPUTS, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    _assert_same(torch.load(tmp_path / "out.pt").float(), ref)


@pytest.mark.parametrize("kw, message", [
    ({"vo_ratio": 1.0}, r"outside \[0, 1\)"),
    ({"vo_ratio": -0.1}, r"outside \[0, 1\)"),
    ({"vo_ratio": 0.99}, "no dimensions"),
    ({"vo_ratio": 0.5, "criterion": "nope"}, "unknown criterion"),
    ({"vo_ratio": 0.5, "vo_whitening": "nope"}, "unknown V-O whitening"),
    ({"vo_ratio": 0.5, "allocation": "nope"}, "unknown allocation"),
    ({"vo_threshold": 0.1, "criterion": "vanilla"}, "threshold needs"),
])
def test_bad_settings_are_clear_errors(kw, message):
    with pytest.raises(CloverError, match=message):
        prune(tiny_gpt2(), PruneConfig(progress=False, calibration=CALIB, **kw))


def test_clover_qk_on_rotary_model_explains_and_names_the_option():
    for criterion in ("clover", "whitened", "vanilla"):
        with pytest.raises(CloverError, match="rotary.*rotary-weight or rotary-activation"):
            prune(tiny_llama(), PruneConfig(qk_ratio=0.5, criterion=criterion, calibration=CALIB, progress=False))


def test_rotary_criterion_on_a_model_without_rotary():
    with pytest.raises(CloverError, match="only"):
        prune(tiny_gpt2(), PruneConfig(qk_ratio=0.5, qk_criterion="rotary-weight", progress=False))


def test_data_aware_criterion_without_calibration():
    with pytest.raises(CloverError, match="calibration"):
        prune(tiny_gpt2(), PruneConfig(vo_ratio=0.5, criterion="whitened", progress=False))


def test_cholesky_retries_with_growing_jitter_and_says_so():
    indefinite = torch.diag(torch.tensor([1.0, -1e-4], dtype=torch.float64))
    said = []
    chol = cholesky_factor(indefinite, name="layer 0", warn=said.append)
    assert torch.isfinite(chol).all() and said and "jitter" in said[0]


def test_cholesky_that_never_succeeds_is_an_error():
    bad = torch.full((3, 3), float("nan"), dtype=torch.float64)
    with pytest.raises(CloverError, match="Cholesky"):
        cholesky_factor(bad, name="layer 0")


def test_pruning_a_pruned_model_composes():
    model = tiny_llama()
    once, _ = prune(model, _config("clover", "rotary-weight", qk_ratio=0.5, vo_ratio=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twice, report = prune(once, _config("clover", "rotary-weight", qk_ratio=0.5, vo_ratio=0.5))
    assert [(lr.qk_dim, lr.vo_dim) for lr in report.layers] == [(4, 4), (4, 4)]
    assert torch.isfinite(model_outputs(twice, INPUTS)).all()


@pytest.mark.parametrize("vo_whitening", ["mixed", "input"])
def test_whitened_at_full_rank_is_exact(vo_whitening):
    model = tiny_gpt2()
    pruned, _ = prune(model, _config("whitened", "whitened", qk_threshold=0.0, vo_threshold=0.0,
                                     vo_whitening=vo_whitening))
    ref = model_outputs(model, INPUTS)
    assert (model_outputs(pruned, INPUTS) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_per_head_refit_lowers_the_error_on_the_calibration_values():
    """The refit of O is least squares on each head's own value statistics: never worse than the pooled SVD."""
    from clover import calibrate
    from clover.criteria import candidate

    model = tiny_llama(num_key_value_heads=1)  # 4 heads share one V: pooling matters
    adapter = adapter_for(model)
    site = adapter.sites(model)[0]
    stats = calibrate.collect(model, adapter, [site], CALIB, head_outputs=True, progress=False).sites[site.name]
    w = adapter.read(site)
    o_heads = factors(w, "vo")[0].double().reshape(4, -1, 16)  # (H, D_out, d) in the original V basis

    def error(refit):
        c = candidate(w, "vo", "whitened", rotary=True, name="l0", stats=stats, vo_whitening="mixed",
                      vo_refit=refit)
        left, _ = c.truncate(6)
        proj = c.projection[0, :6]
        new_o = left.reshape(4, -1, 6)
        total = 0.0
        for h in range(4):
            diff = o_heads[h] - new_o[h] @ proj  # maps a value u to O_h u - O_h' P u
            total += torch.trace(diff @ stats.head_output[h] @ diff.mT).item()
        return total

    assert error(True) <= error(False) * (1 + 1e-9)


def tiny_mistral(sliding_window=None):
    cfg = MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=128, max_position_embeddings=128, initializer_range=INIT,
                        sliding_window=sliding_window, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _build(MistralForCausalLM, cfg)


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_mistral], ids=["qwen2", "mistral"])
def test_mistral_and_qwen2_prune_into_the_llama_runtime(build, tmp_path):
    """Same attention as LLaMA (Qwen2: biases on q, k, v only): full rank is exact, pruned decodes and reloads."""
    model = build()
    full, _ = prune(model, _config("clover", None, vo_threshold=0.0))
    assert full.config.model_type == "clover_llama"
    ref = model_outputs(model, INPUTS)
    assert (model_outputs(full, INPUTS) - ref).abs().max() <= 1e-4 * ref.abs().max()

    pruned, report = prune(model, _config("whitened", "rotary-activation", qk_ratio=0.5, vo_ratio=0.5))
    assert report.kv_bytes_per_token_after * 2 == report.kv_bytes_per_token_before
    out = pruned.generate(INPUTS["input_ids"][:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
    save_model(pruned, None, tmp_path / "m", report=report.to_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    _assert_same(model_outputs(loaded, INPUTS), model_outputs(pruned, INPUTS))


def test_sliding_window_attention_is_refused_for_pruning():
    with pytest.raises(CloverError, match="sliding-window attention"):
        prune(tiny_mistral(sliding_window=16), _config("clover", None, vo_ratio=0.5))


def test_bfloat16_prune_reports_the_model_it_saves(tmp_path):
    """In bfloat16 the pruned model keeps the float32 rotary frequencies the loader keeps, so what prune returns
    (and reports perplexity for) computes exactly what the saved checkpoint computes once reloaded."""
    from clover.models import load
    from clover.save import save_model

    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "src")
    model = load(str(tmp_path / "src"), dtype="bfloat16").model
    pruned, _ = prune(model, PruneConfig(vo_ratio=0.5, progress=False))
    assert {b.dtype for b in pruned.buffers()} == {b.dtype for b in model.buffers()} == {torch.float32}
    save_model(pruned, None, tmp_path / "out")
    reloaded = load(str(tmp_path / "out")).model
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reloaded(ids).logits)


# --- --vo-whitening auto: the choice is made from held-out calibration windows ------------------------------------

AUTO_CALIB = {name: torch.randint(0, 300 if name == "llama" else 128, (12, 32),
                                  generator=torch.Generator().manual_seed(0)) for name in ("llama", "gpt2")}


@pytest.mark.parametrize("family,whitening", [("llama", "input"), ("gpt2", "mixed")])
def test_vo_whitening_auto_takes_the_choice_that_stays_closest_on_held_out_windows(family, whitening):
    """On these two tiny families different choices win (as mixed won on SmolLM2 and input on a real Whisper
    encoder): auto must find each, score every choice, and return exactly the winner's prune from all windows."""
    model = tiny_llama(vocab_size=300) if family == "llama" else tiny_gpt2()
    calib = AUTO_CALIB[family]
    pruned, report = prune(model, PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=calib, progress=False))
    assert set(report.vo_whitening_losses) == {"mixed+refit", "mixed", "input"}
    winner = report.vo_whitening
    assert winner == min(report.vo_whitening_losses, key=report.vo_whitening_losses.get)
    assert winner.partition("+")[0] == whitening  # (GPT-2's O refit changes next to nothing: either mixed may win)
    assert any(n.startswith(f"--vo-whitening auto chose {winner}") for n in report.notes)
    refit = winner.endswith("+refit")
    explicit, fixed = prune(model, PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=calib, progress=False,
                                               vo_whitening=whitening, vo_refit=bool(refit)))
    assert fixed.vo_whitening == winner and not fixed.vo_whitening_losses
    for (name, got), want in zip(pruned.state_dict().items(), explicit.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_vo_whitening_auto_needs_held_out_windows_else_uses_mixed():
    model = tiny_llama(vocab_size=300)
    _, report = prune(model, PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=AUTO_CALIB["llama"][:4],
                                         progress=False))
    assert report.vo_whitening == "mixed+refit" and not report.vo_whitening_losses
    assert any("holds out the last 4" in n for n in report.notes)
    _, clover_report = prune(model, PruneConfig(vo_ratio=0.5, criterion="clover", progress=False))
    assert clover_report.vo_whitening is None  # no whitening to choose
