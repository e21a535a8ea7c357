"""MLA conversion to a stock DeepSeek-V3 checkpoint: exact where the format can hold the model, verified against
clover's reference everywhere, loadable where clover is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DATA, tiny_llama
from tiny_tokenizer import tiny_tokenizer
from transformers import DeepseekV3ForCausalLM, LlamaConfig, MistralConfig, MistralForCausalLM
from typer.testing import CliRunner

import clover  # noqa: F401
from clover.cli import app
from clover.errors import CloverError
from clover.mla import MlaConfig, to_mla
from clover.mla.reference import reference_model
from clover.mla.solve import full_rank
from clover.save import save_model
from clover.verify import model_outputs

CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
INPUTS = {"input_ids": torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1)), "use_cache": False}
runner = CliRunner()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


@pytest.fixture(scope="module")
def mqa():
    """One KV head: every frequency has one rotary component, so the format holds the model exactly."""
    return tiny_llama(vocab_size=300, num_key_value_heads=1)


@pytest.fixture(scope="module")
def mqa_mla(mqa):
    return to_mla(mqa, MlaConfig(calibration=CALIB, split=1.0, progress=False))


def test_a_model_the_format_can_hold_converts_exactly(mqa, mqa_mla):
    mla, report = mqa_mla
    assert isinstance(mla, DeepseekV3ForCausalLM) and report.kv_lora_rank == report.full_rank == 16
    assert report.qk_nope_head_dim == 0 and all(lr.rope_energy == pytest.approx(1.0) for lr in report.layers)
    assert relative(model_outputs(mla, INPUTS), model_outputs(mqa, INPUTS)) < 1e-5
    assert report.kv_bytes_per_token_after == report.kv_bytes_per_token_before  # 16 latent + 16 rope = 2 x 16


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_the_stock_model_computes_the_converted_function(kv_heads, ratio):
    model = tiny_llama(vocab_size=300, num_key_value_heads=kv_heads)
    mla, report = to_mla(model, MlaConfig(kv_ratio=ratio, calibration=CALIB, progress=False))
    head_dim = 16
    assert report.qk_nope_head_dim == (kv_heads - 1) * head_dim and report.qk_rope_head_dim == head_dim
    assert report.full_rank == full_rank(kv_heads, head_dim)
    assert report.kv_lora_rank + head_dim == round((1 - ratio) * 2 * kv_heads * head_dim)
    assert report.kv_bytes_per_token_after * (1 / (1 - ratio)) == pytest.approx(report.kv_bytes_per_token_before)
    assert report.check["passed"] and report.check["relative_diff"] < 1e-4
    assert set(report.split_losses) == {"0.25", "1", "4", "16"} and f"{report.split:g}" in report.split_losses
    assert mla.config.kv_lora_rank == report.kv_lora_rank and mla.config.first_k_dense_replace == 2


def test_float32_rounding_gets_a_float64_second_chance_and_a_wrong_weight_does_not(monkeypatch):
    """With the float32 tolerance forced to 0, a correct conversion passes on the float64 measure (no further from
    the exact function than a few times clover's own float32 reference) and a weight off by 1% is still refused."""
    from clover.mla import convert, deepseek
    from clover.verify import TOLERANCE

    monkeypatch.setitem(TOLERANCE, torch.float32, 0.0)
    model = tiny_llama(vocab_size=300, num_key_value_heads=2)
    config = MlaConfig(kv_ratio=0.5, calibration=CALIB, split=1.0, progress=False)
    _, report = to_mla(model, config)
    exact = report.check["float64_reference"]
    assert report.check["passed"] and 0 < exact["float32_reference_relative_diff"] < 1e-5
    assert exact["stock_relative_diff"] <= exact["factor"] * exact["float32_reference_relative_diff"]

    build = deepseek.build

    def off_by_one_percent(*args, **kwargs):
        mla = build(*args, **kwargs)
        with torch.no_grad():
            mla.model.layers[0].self_attn.o_proj.weight.mul_(1.01)
        return mla

    monkeypatch.setattr(convert.deepseek, "build", off_by_one_percent)
    with pytest.raises(CloverError, match="float64 reference"):
        to_mla(model, config)


def test_the_latent_norm_acts_linearly_for_any_input(mqa, mqa_mla):
    """kv_a_layernorm divides by a constant: the latent is scaled far below its epsilon for every input the layer
    can see (RMS-normalised states times the norm weight; the bound is on the weights, not on data)."""
    mla, _ = mqa_mla
    rank = mla.config.kv_lora_rank
    for block, original in zip(mla.model.layers, mqa.model.layers, strict=True):
        attn = block.self_attn
        for seed, spike in ((2, 1.0), (3, 1e4)):  # a spiky state has the same RMS: one coordinate holds it all
            x = torch.randn(5, 64, generator=torch.Generator().manual_seed(seed))
            x[:, 0] *= spike
            x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * original.input_layernorm.weight
            latent = attn.kv_a_proj_with_mqa(x)[:, :rank]
            linear = latent * attn.kv_a_layernorm.weight / attn.kv_a_layernorm.variance_epsilon**0.5
            assert relative(attn.kv_a_layernorm(latent), linear) < 1e-6


def test_every_exact_pair_is_written_in_clovers_balanced_form():
    """Each head's unrotated Q-K pair and its V-O pair leave the conversion as ``U sqrt(S)`` | ``V sqrt(S)``: both
    sides' Gram matrices are the same diagonal (the singular values), relative to their scale. The O refit alone
    leaves the scale split wherever least squares put it."""
    from clover.adapters import adapter_for
    from clover.pairs import factors

    model = tiny_llama(vocab_size=300, num_key_value_heads=2)
    mla, report = to_mla(model, MlaConfig(kv_ratio=0.5, calibration=CALIB, split=1.0, progress=False))
    assert report.check["passed"]
    adapter = adapter_for(mla)
    for site in adapter.sites(mla):
        weights = adapter.read(site)
        for kind in ("qk", "vo"):
            left, right = (f.double() for f in factors(weights, kind))
            gram_left, gram_right = left.mT @ left, right.mT @ right
            scale = gram_left.abs().amax()
            assert float((gram_left - gram_right).abs().amax() / scale) < 1e-5
            off_diagonal = gram_left - torch.diag_embed(torch.diagonal(gram_left, dim1=-2, dim2=-1))
            assert float(off_diagonal.abs().amax() / scale) < 1e-5


def test_saved_checkpoint_loads_without_clover(tmp_path):
    model = tiny_llama(vocab_size=300, num_key_value_heads=2)
    # unrotated "nope", no O refit: _layers re-solves without the attention statistics (every lever is checked against the
    # reference inside to_mla, tests/test_mla_levers.py)
    mla, report = to_mla(model, MlaConfig(kv_ratio=0.5, calibration=CALIB, unrotated="nope", o_refit=False,
                                          progress=False))
    save_model(mla, tiny_tokenizer(), tmp_path / "mla", report=report.to_dict())
    config = json.loads((tmp_path / "mla" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert not list((tmp_path / "mla").glob("*.py"))
    ids = INPUTS["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["clover"] = None  # this process cannot import clover
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'mla')!r}).eval()
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / 'ids.pt')!r}), use_cache=False).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = model_outputs(reference_model(model, _layers(model, report), 16), INPUTS)
    assert relative(torch.load(tmp_path / "logits.pt"), expected) < 1e-4


def _layers(model, report):
    """Re-solve the layers the report describes (same calibration, split and rank) for the reference."""
    from clover import calibrate
    from clover.adapters import adapter_for
    from clover.mla.convert import _layer_parts
    from clover.mla.solve import latent_layer

    adapter = adapter_for(model)
    sites = adapter.sites(model)
    stats = calibrate.collect(model, adapter, sites, CALIB[:-4], inputs=True, progress=False)
    return [latent_layer(_layer_parts(adapter, s, stats.sites[s.name].q_input, torch.float64), report.kv_lora_rank,
                         report.split) for s in sites]


def test_generation_runs_from_the_latent_cache(mqa, mqa_mla):
    mla, _ = mqa_mla
    prompt = INPUTS["input_ids"][:1, :8]
    want = mqa.generate(prompt, max_new_tokens=6, do_sample=False)
    got = mla.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)  # exact model: the same greedy tokens, through DeepSeek-V3's latent cache


@pytest.mark.parametrize("make,message", [
    (lambda: MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              sliding_window=16)), "sliding-window"),
    (lambda: tiny_llama(vocab_size=300, attention_bias=True), "biases"),
    (lambda: tiny_llama(vocab_size=300, rope_scaling={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}), "RoPE scaling"),
])
def test_what_the_format_cannot_hold_is_refused(make, message):
    with pytest.raises(CloverError, match=message):
        to_mla(make(), MlaConfig(calibration=CALIB, split=1.0, progress=False))


def test_ranks_are_checked_against_the_format_and_the_engine():
    config = LlamaConfig(vocab_size=300, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=2, intermediate_size=64)  # SmolLM2's attention shape
    assert MlaConfig(kv_ratio=0.5).check_against(config) == 128
    assert MlaConfig(kv_ratio=0.75).check_against(config) == 32
    with pytest.raises(CloverError, match="no more than the shared rotated key"):
        MlaConfig(kv_ratio=0.9).check_against(config)
    with pytest.raises(CloverError, match=r"320 or 576.*--kv-ratio 0.166667 \(kv_lora_rank 256\)"):
        MlaConfig(kv_ratio=0.5, preset="vllm").check_against(config)
    assert MlaConfig(kv_ratio=1 - 320 / 384, preset="vllm").check_against(config) == 256


@pytest.mark.skipif(not DATA, reason="WikiText-2 not found (set CLOVER_DATA)")
def test_cli_converts_saves_and_refuses(tmp_path):
    folder = tmp_path / "llama"
    tiny_llama(vocab_size=300, num_key_value_heads=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = runner.invoke(app, ["mla", str(folder), "--out", str(tmp_path / "out"), "--kv-ratio", "0.5",
                                 "--calib-samples", "6", "--calib-seqlen", "32", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kv_lora_rank"] == 16 and report["target"] == "DeepseekV3ForCausalLM"
    assert (tmp_path / "out" / "config.json").is_file()
    result = runner.invoke(app, ["mla", str(folder), "--out", str(tmp_path / "out"), "--kv-ratio", "0.5"])
    assert result.exit_code == 2 and "exists" in result.output
    result = runner.invoke(app, ["mla", str(folder), "--out", str(tmp_path / "x"), "--kv-ratio", "0.8"])
    assert result.exit_code == 2 and "no more than the shared rotated key" in result.output
    too_little = {"held-out calibration windows": ["--calib-samples", "4"],  # all held out, none for statistics
                  "cannot estimate": ["--calib-samples", "1", "--calib-seqlen", "16", "--split", "1"]}
    for message, options in too_little.items():
        result = runner.invoke(app, ["mla", str(folder), "--out", str(tmp_path / "x"), "--kv-ratio", "0.5", *options])
        assert result.exit_code == 2 and message in result.output.strip().splitlines()[-1], result.output
    assert not (tmp_path / "x").exists()


# --- the plain llama layout with fewer KV heads -----------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [2, 4])
def test_gqa_layout_with_as_many_kv_heads_is_exact(kv_heads):
    model = tiny_llama(vocab_size=300, num_key_value_heads=kv_heads)
    out, report = to_mla(model, MlaConfig(layout="gqa", kv_heads=kv_heads, calibration=CALIB, progress=False))
    assert type(out) is type(model) and report.kv_heads == kv_heads and report.layout == "gqa"
    assert relative(model_outputs(out, INPUTS), model_outputs(model, INPUTS)) < 1e-5


def test_gqa_layout_with_one_kv_head_is_a_stock_llama_with_a_third_of_the_cache(tmp_path):
    model = tiny_llama(vocab_size=300, num_key_value_heads=2)
    out, report = to_mla(model, MlaConfig(layout="gqa", kv_heads=1, calibration=CALIB, progress=False))
    assert out.config.num_key_value_heads == 1 and out.config.model_type == "llama"
    assert report.kv_bytes_per_token_after * 2 == report.kv_bytes_per_token_before
    assert all(0.5 <= lr.rope_energy <= 1 and 0 < lr.latent_energy <= 1 for lr in report.layers)
    assert any("keeps the strongest and drops the rest" in n for n in report.notes)
    save_model(out, tiny_tokenizer(), tmp_path / "gqa")
    config = json.loads((tmp_path / "gqa" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 1 and "auto_map" not in config


@pytest.mark.parametrize("settings,message", [({"kv_heads": 3}, "must divide the model's 2 KV heads"),
                                              ({"kv_heads": 1, "kv_ratio": 0.5}, "drop --kv-ratio"),
                                              ({"kv_heads": 0}, "at least 1")])
def test_gqa_layout_refuses_what_it_cannot_build(settings, message):
    with pytest.raises(CloverError, match=message):
        to_mla(tiny_llama(vocab_size=300), MlaConfig(layout="gqa", calibration=CALIB, **settings))
