import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

import clover.pairs as pairs
from clover.adapters import adapter_for
from clover.errors import CloverError
from clover.orthogonalize import OrthogonalizeConfig, orthogonalize_
from clover.pairs import factors
from clover.verify import model_outputs

QUIET = OrthogonalizeConfig(progress=False)


def _products(model):
    """Every site's Q-K and V-O products (per KV group), in float64."""
    adapter = adapter_for(model)
    out = {}
    for site in adapter.sites(model):
        w = adapter.read(site)
        for kind in ("qk", "vo"):
            left, right = factors(w, kind)
            out[site.name, kind] = left.double() @ right.double().mT
    return out


def test_rewrite_is_lossless_for_every_adapter(tiny_model):
    name, model = tiny_model
    inputs = adapter_for(model).example_inputs(model)
    before_logits = model_outputs(model, inputs)
    before = _products(model)
    report = orthogonalize_(model, QUIET)
    after = _products(model)
    for key, product in before.items():
        assert (after[key] - product).abs().max() <= 1e-5 * product.abs().max(), key
    after_logits = model_outputs(model, inputs)
    scale = before_logits.abs().max()
    assert (after_logits - before_logits).abs().max() <= 1e-4 * scale
    assert report.check.passed and report.check.relative_diff <= 1e-4
    # The attention really matters in these models (otherwise this test would prove nothing).
    assert before_logits.std() > 0.1


def test_rewritten_directions_are_orthogonal_and_sorted(tiny_model):
    name, model = tiny_model
    report = orthogonalize_(model, QUIET)
    adapter = adapter_for(model)
    for site in adapter.sites(model):
        w = adapter.read(site)
        for kind in ("qk", "vo"):
            if any(p.site == site.name and p.kind == kind and p.status == "skipped" for p in report.pairs):
                continue
            left, right = (f.double() for f in factors(w, kind))
            for gram in (left.mT @ left, right.mT @ right):
                off = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
                assert off.abs().max() <= 1e-4 * gram.abs().max()
            s = (left.norm(dim=-2) * right.norm(dim=-2))  # = singular values when sqrt(S) sits on each side
            assert bool((s[..., :-1] >= s[..., 1:] - 1e-4 * s.max()).all())


def test_rotary_qk_is_skipped_and_left_untouched():
    model = tiny_llama()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
    report = orthogonalize_(model, QUIET)
    qk = [p for p in report.pairs if p.kind == "qk"]
    assert qk and all(p.status == "skipped" and "rotary" in p.reason for p in qk)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)
    assert not torch.equal(model.model.layers[0].self_attn.v_proj.weight, v_before)


def test_cross_attention_blocks_are_rewritten_exactly():
    for model in (tiny_gpt2(add_cross_attention=True), tiny_bert(is_decoder=True, add_cross_attention=True)):
        report = orthogonalize_(model, QUIET)
        roles = {p.role for p in report.pairs if p.status == "rewritten"}
        assert roles == {"self", "cross"}
        assert report.check.passed


def test_broken_rewrite_is_caught(monkeypatch):
    """Negative control: drop the weakest direction of every pair and the lossless check must fail."""
    real = pairs.decompose

    def lossy(left, right, **kw):
        out = real(left, right, **kw)
        out.left[..., -1] = 0
        return out

    monkeypatch.setattr(pairs, "decompose", lossy)
    with pytest.raises(CloverError, match="lossless check failed"):
        orthogonalize_(tiny_gpt2(), QUIET)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_keep_their_dtype(dtype):
    model = tiny_llama(attention_bias=True).to(dtype)
    report = orthogonalize_(model, QUIET)
    assert model.model.layers[0].self_attn.v_proj.weight.dtype == dtype
    assert report.check.passed


def test_float32_compute():
    model = tiny_gpt2()
    report = orthogonalize_(model, OrthogonalizeConfig(compute_dtype=torch.float32, progress=False))
    assert report.check.passed


def test_unknown_architecture_lists_supported():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=64))
    with pytest.raises(CloverError, match="unsupported model type 'gpt_neox'.*bert.*gpt2.*llama"):
        orthogonalize_(model, QUIET)


def test_unknown_pair_kind():
    with pytest.raises(CloverError, match="unknown pair kind"):
        orthogonalize_(tiny_gpt2(), OrthogonalizeConfig(pairs=("qk", "xy"), progress=False))
