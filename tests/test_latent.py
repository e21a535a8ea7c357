"""Latent KV conversion (clover.latent): exact at full rank, a cache that holds only the latents, and a runtime
that computes exactly the rewrite it was built from, through cache, generate, save and reload."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from clover.errors import CloverError
from clover.latent import LatentConfig, to_latent
from clover.save import save_model

from conftest import VOCAB, _build, logits_without_clover, tiny_llama, tiny_qwen2

CALIB = torch.randint(1, VOCAB, (10, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference ``b``'s own scale (CPU-independent bound)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def convert(model, **kw):
    return to_latent(model, LatentConfig(calibration=CALIB, progress=False, **kw))


def llama_scaled(rope_parameters):
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.3,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, rope_parameters=rope_parameters)
    return _build(LlamaForCausalLM, cfg)


def tiny_gpt2_model():
    from conftest import tiny_gpt2

    return tiny_gpt2()


def tiny_mistral(sliding_window=None):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.3,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, sliding_window=sliding_window)
    return _build(MistralForCausalLM, cfg)


MODELS = {
    "mistral": tiny_mistral,
    "llama-gqa": lambda: tiny_llama(num_key_value_heads=2),
    "llama-mha": lambda: tiny_llama(num_key_value_heads=4),
    "qwen2-bias": tiny_qwen2,
    "llama3-rope": lambda: llama_scaled({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}),
    "yarn-rope": lambda: llama_scaled({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("rope", ["latent", "shared", "mix"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_rank_conversion_is_exact(name, rope):
    model = MODELS[name]()
    latent, report = convert(model, rope=rope)
    assert latent.config.model_type == "clover_latent_llama"
    assert rel(logits(latent), logits(model)) < 1e-4
    assert report.kv_bytes_per_token_after == report.kv_bytes_per_token_before


def cache_bytes(model, ids=IDS) -> int:
    """Bytes per token per sequence actually held by the cache after a prefill."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total // ids.numel()


@pytest.mark.parametrize("rope", ["latent", "shared", "mix"])
def test_cache_holds_only_the_latent(rope):
    model = tiny_llama(num_key_value_heads=2)
    latent, report = convert(model, rope=rope, kv_ratio=0.5)
    assert cache_bytes(model) == report.kv_bytes_per_token_before
    assert cache_bytes(latent) == report.kv_bytes_per_token_after
    assert report.kv_bytes_per_token_after == report.kv_bytes_per_token_before // 2
    for layer in report.layers:
        assert layer.k_rank + 2 * layer.shared_components >= 1 and layer.v_rank >= 1
    if rope == "shared":
        assert all(layer.k_rank == 0 and layer.shared_components for layer in report.layers)
    if rope == "latent":
        assert all(layer.shared_components == 0 for layer in report.layers)


@pytest.mark.parametrize("rope", ["latent", "shared", "mix"])
def test_cached_decoding_matches_full_forward(rope):
    """Keys rebuilt from the cached latent at their cache positions, and components cached after rotation, give
    the same next-token logits step by step as one pass over the whole sequence (also with left padding)."""
    model = tiny_llama(num_key_value_heads=2)
    latent, _ = convert(model, rope=rope, kv_ratio=0.5)
    mask = torch.ones_like(IDS)
    mask[0, :4] = 0
    full = logits(latent, attention_mask=mask)
    cache = DynamicCache(config=latent.config)
    steps = []
    with torch.no_grad():
        out = latent(input_ids=IDS[:, :12], attention_mask=mask[:, :12], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        for t in range(12, IDS.shape[1]):
            out = latent(input_ids=IDS[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                         use_cache=True)
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert rel(stepped[1], full[1]) < 1e-4
    assert rel(stepped[0, 4:], full[0, 4:]) < 1e-4  # the padded positions of row 0 carry no meaning


def test_generate_at_full_rank_matches_the_original():
    model = tiny_llama(num_key_value_heads=2)
    latent, _ = convert(model, rope="mix")
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(latent.generate(IDS[:, :6], **settings), model.generate(IDS[:, :6], **settings))


def test_save_reload_with_and_without_clover(tmp_path):
    model = tiny_qwen2()
    latent, report = convert(model, rope="mix", kv_ratio=0.5)
    ref = logits(latent)
    save_model(latent, None, tmp_path / "m", report=report.to_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(latent)
    assert rel(logits(loaded), ref) < 1e-6
    assert rel(logits_without_clover(tmp_path / "m", IDS, tmp_path), ref) < 1e-6


def test_split_is_chosen_on_held_out_windows():
    model = tiny_llama(num_key_value_heads=2)
    _, report = convert(model, kv_ratio=0.5, split_grid=(0.5, 2.0))
    assert set(report.split_losses) == {"0.5", "2"}
    assert report.split == min((0.5, 2.0), key=lambda s: report.split_losses[f"{s:g}"])


def test_input_model_is_untouched():
    model = tiny_llama(num_key_value_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, kv_ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw, message", [
    ({"kv_ratio": 1.0}, r"outside \[0, 1\)"),
    ({"kv_ratio": 0.99}, "fewer than one key and one value dim"),
    ({"k_dims": 8}, "go together"),
    ({"k_dims": 64, "v_dims": 8}, "has at most"),
    ({"k_dims": 0, "v_dims": 8}, "no key or value dims"),
    ({"rope": "nope"}, "unknown --rope"),
    ({"split": 0.0}, "must be positive"),
    ({"kv_ratio": 0.5, "split": 1.0, "calibration": CALIB[:1, :8]}, "calibration tokens"),
    ({"kv_ratio": 0.5, "calibration": CALIB[:3]}, "held-out calibration windows"),
])
def test_bad_settings_fail_with_one_line(kw, message):
    model = tiny_llama(num_key_value_heads=2)
    settings = {"calibration": CALIB, "progress": False, **kw}
    with pytest.raises(CloverError, match=message) as error:
        to_latent(model, LatentConfig(**settings))
    assert "\n" not in str(error.value)


def test_unsupported_models_are_refused():
    from conftest import tiny_bert, tiny_gpt2

    with pytest.raises(CloverError, match="LLaMA family and GPT-2"):
        convert(tiny_bert())
    with pytest.raises(CloverError, match="no rotary embeddings"):
        convert(tiny_gpt2(), rope="shared")
    with pytest.raises(CloverError, match="sliding-window"):
        convert(tiny_mistral(sliding_window=16))
    dynamic = llama_scaled({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(CloverError, match="rotary scaling 'dynamic'"):
        convert(dynamic)


def test_clover_on_top_orthogonalize_prune_tune_merge_reload(tmp_path):
    """The poster's combination: convert, then CLOVER on the latent model's V-O (one multi-query group per layer):
    orthogonalize is exact, prune shrinks the value latent and the cache, fine-tuning is exact at step 0 and merges
    back into a model that saves and reloads."""
    from clover import OrthogonalizeConfig, PruneConfig, orthogonalize_, prune
    from clover.finetune import TuneConfig, attach, merge_

    latent, report = convert(tiny_llama(num_key_value_heads=2), rope="latent", kv_ratio=0.25)
    before = logits(latent)
    orth = orthogonalize_(latent, OrthogonalizeConfig(progress=False))
    assert orth.check.passed and rel(logits(latent), before) < 1e-4
    pruned, pr = prune(latent, PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=CALIB, progress=False))
    assert pruned.config.model_type == "clover_latent_llama"
    assert all(1 <= a < b for a, b in zip(pruned.config.v_ranks, latent.config.v_ranks, strict=True))
    assert cache_bytes(pruned) == pr.kv_bytes_per_token_after < pr.kv_bytes_per_token_before
    tuned = attach(pruned, TuneConfig(progress=False))
    assert tuned.targets == ("vo", "up") and tuned.check.passed
    with torch.no_grad():
        for p in pruned.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    want = logits(pruned)
    merge_(pruned)
    assert rel(logits(pruned), want) < 1e-4
    save_model(pruned, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert rel(logits(reloaded), want) < 1e-4
    with pytest.raises(CloverError, match="use 'vo' and 'up'"):
        attach(reloaded, TuneConfig(targets="k,vo", progress=False))


def test_gpt2_converts_exactly_and_absorbs_everything(tmp_path):
    """No RoPE: the key latent folds into the queries, so the cache holds k_rank + v_rank numbers per layer and
    nothing is rebuilt; exact at full rank, cached decoding matches the full pass, saves and reloads."""
    model = tiny_gpt2_model()
    full, _ = convert(model)
    assert full.config.model_type == "clover_latent_gpt2"
    assert rel(logits(full), logits(model)) < 1e-4
    latent, report = convert(model, kv_ratio=0.5)
    assert cache_bytes(latent) == report.kv_bytes_per_token_after == report.kv_bytes_per_token_before // 2
    cache = DynamicCache(config=latent.config)
    with torch.no_grad():
        steps = [latent(input_ids=IDS[:, :12], past_key_values=cache, use_cache=True).logits]
        for t in range(12, IDS.shape[1]):
            steps.append(latent(input_ids=IDS[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert rel(torch.cat(steps, dim=1), logits(latent)) < 1e-4
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(full.generate(IDS[:, :6], **settings), model.generate(IDS[:, :6], **settings))
    save_model(latent, None, tmp_path / "g", report=report.to_dict())
    assert rel(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()), logits(latent)) < 1e-6
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "g", trust_remote_code=True).eval()
    assert rel(logits(remote), logits(latent)) < 1e-6


def test_cli_recipe_convert_prune_tune_and_bad_input(tmp_path):
    """The README's recipe through the CLI (convert -> prune -> tune), and one-line errors that write nothing."""
    from typer.testing import CliRunner

    from clover.cli import app
    from conftest import DATA, tiny_bert
    from tiny_tokenizer import SAMPLE_TEXT, tiny_tokenizer

    if DATA is None:
        pytest.skip("no local WikiText-2 (CLOVER_DATA)")
    tokenizer = tiny_tokenizer()
    base = tmp_path / "base"
    tiny_llama(num_key_value_heads=2, vocab_size=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    calib = ["--calib-samples", "8", "--calib-seqlen", "48"]
    runner = CliRunner()
    done = runner.invoke(app, ["latent", str(base), "--kv-ratio", "0.5", "--rope", "mix", *calib, "--out",
                               str(tmp_path / "kv50"), "--json", str(tmp_path / "kv50.json")])
    assert done.exit_code == 0, done.output
    assert "value latent" in done.output
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "kv50")
    assert converted.config.model_type == "clover_latent_llama"
    done = runner.invoke(app, ["prune", str(tmp_path / "kv50"), "--vo-ratio", "0.25", "--criterion", "whitened",
                               *calib, "--out", str(tmp_path / "kv50-vo25")])
    assert done.exit_code == 0, done.output
    data = tmp_path / "train.txt"
    data.write_text(SAMPLE_TEXT * 10)
    done = runner.invoke(app, ["finetune", str(tmp_path / "kv50-vo25"), "--data", str(data), "--method", "clover",
                               "--targets", "vo,up", "--steps", "2", "--batch-size", "2", "--seqlen", "32",
                               "--out", str(tmp_path / "tuned")])
    assert done.exit_code == 0, done.output
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert tuned.config.v_ranks == AutoModelForCausalLM.from_pretrained(tmp_path / "kv50-vo25").config.v_ranks

    tiny_bert().save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    for args, message in [
        ([str(base), "--kv-ratio", "1.0"], "outside [0, 1)"),
        ([str(base), "--rope", "sideways"], "unknown --rope"),
        ([str(base), "--split", "heavy"], "--split 'heavy'"),
        ([str(base), "--kv-ratio", "0.5", "--calib-samples", "3", "--calib-seqlen", "32"], "held-out"),
        ([str(tmp_path / "bert")], "LLaMA family and GPT-2"),
        ([str(base), "--kv-ratio", "0.5", "--calib-seqlen", "4096"], "--calib-seqlen"),
    ]:
        bad = runner.invoke(app, ["latent", *args, "--out", str(tmp_path / "bad")])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
        assert not (tmp_path / "bad").exists()
    taken = runner.invoke(app, ["latent", str(base), "--out", str(tmp_path / "kv50")])
    assert taken.exit_code == 2 and "--overwrite" in taken.output


def test_shared_components_prune_by_rotary_pairs_and_tune_k():
    """Q-K of a latent model is the shared rotary components: rotary-pair criteria drop whole components (the cache
    shrinks by two numbers per component), and the default fine-tuning recipe trains k_rope exactly."""
    from clover import PruneConfig, prune
    from clover.finetune import TuneConfig, attach

    latent, _ = convert(tiny_llama(num_key_value_heads=2), rope="shared", kv_ratio=0.25)
    pruned, report = prune(latent, PruneConfig(qk_ratio=0.5, vo_ratio=0.25, criterion="whitened",
                                               qk_criterion="rotary-activation", calibration=CALIB, progress=False))
    for before, after in zip(latent.config.rope_freqs, pruned.config.rope_freqs, strict=True):
        assert 1 <= len(after) < len(before) and set(after) <= set(before)
    assert cache_bytes(pruned) == report.kv_bytes_per_token_after < report.kv_bytes_per_token_before
    assert torch.isfinite(logits(pruned)).all()
    tuned = attach(pruned, TuneConfig(progress=False))
    assert tuned.targets == ("k", "vo", "up") and tuned.check.passed
