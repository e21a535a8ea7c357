"""DeepSeek-V2 (multi-head latent attention): orthogonalize, prune, save/load with stock classes, bad variants.

Tiny random configs with one dense layer and one MoE layer. The key trick for exactness after pruning: a model
whose k_nope / v rows are partly zero has products of lower rank, so pruning exactly those dead dims must leave
the logits unchanged, which only holds if the splicing is right and the original softmax scale survives the
stock class recomputing it from the smaller ``qk_head_dim``.
"""

import json
import warnings

import pytest
import torch
from conftest import DATA, INIT
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM
from typer.testing import CliRunner

from clover.adapters import adapter_for
from clover.calibrate import collect
from clover.cli import app
from clover.errors import CloverError
from clover.orthogonalize import OrthogonalizeConfig, orthogonalize_
from clover.prune import PruneConfig, prune
from clover.save import save_model

NOPE, ROPE, V_DIM, HEADS = 12, 8, 10, 4
YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32,
        "mscale_all_dim": 1.0, "mscale": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
VARIANTS = {"q_proj": {}, "q_lora": {"q_lora_rank": 16}, "q_lora_yarn": {"q_lora_rank": 16, "rope_parameters": YARN}}
ATTENTION_WEIGHTS = ("q_proj.weight", "q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight")


def tiny_deepseek(vocab_size=128, **kw):
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=HEADS, q_lora_rank=None, kv_lora_rank=24,
                    qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V_DIM, n_routed_experts=4,
                    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=128,
                    initializer_range=INIT, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(DeepseekV2Config(**{**settings, **kw})).eval()


def with_dead_dims(model, qk_dead, vo_dead):
    """Zero the last ``qk_dead`` k_nope rows and ``vo_dead`` v rows of every head: products lose that much rank."""
    with torch.no_grad():
        for layer in model.model.layers:
            kv = layer.self_attn.kv_b_proj.weight.view(HEADS, NOPE + V_DIM, -1)
            kv[:, NOPE - qk_dead:NOPE] = 0
            kv[:, NOPE + V_DIM - vo_dead:] = 0
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_orthogonalize_is_exact_and_leaves_rope_and_moe_alone(variant, tokens):
    model = tiny_deepseek(**VARIANTS[variant])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model, tokens)
    report = orthogonalize_(model, OrthogonalizeConfig(progress=False))
    assert report.counts() == {"qk rewritten": 2, "vo rewritten": 2} and report.check.passed
    assert close(logits(model, tokens), reference)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(ATTENTION_WEIGHTS) for k in changed)
    for layer in model.model.layers:  # rotary query rows are never touched
        attn = layer.self_attn
        name = "q_proj" if attn.q_proj is not None else "q_b_proj"
        key = f"model.layers.{attn.layer_idx}.self_attn.{name}.weight"
        assert torch.equal(before[key].view(HEADS, NOPE + ROPE, -1)[:, NOPE:],
                           after[key].view(HEADS, NOPE + ROPE, -1)[:, NOPE:])
    # the Q-K singular values sort: per head, columns of the new k_nope are orthogonal with decreasing norms
    k = model.model.layers[0].self_attn.kv_b_proj.weight.view(HEADS, NOPE + V_DIM, -1)[0, :NOPE].double()
    gram = k @ k.T
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-4 * gram.abs().max().item())
    assert (gram.diagonal()[:-1] >= gram.diagonal()[1:] - 1e-6).all()


@pytest.mark.parametrize("criterion", ["vanilla", "clover", "whitened"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pruning_dead_dims_is_exact_with_the_original_softmax_scale(variant, criterion, tokens, calibration):
    model = with_dead_dims(tiny_deepseek(**VARIANTS[variant]), qk_dead=6, vo_dead=5)
    original_scale = model.model.layers[0].self_attn.scaling
    with warnings.catch_warnings():  # whitened: the dead value dims make a singular moment (jitter warning)
        warnings.simplefilter("ignore")
        pruned, report = prune(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.5, criterion=criterion,
                                                  calibration=calibration, progress=False))
    attn = pruned.model.layers[1].self_attn
    query = attn.q_proj if attn.q_proj is not None else attn.q_b_proj
    assert type(pruned) is DeepseekV2ForCausalLM
    assert (pruned.config.qk_nope_head_dim, pruned.config.v_head_dim) == (6, 5)
    assert query.weight.shape[0] == HEADS * (6 + ROPE) and attn.kv_b_proj.weight.shape[0] == HEADS * (6 + 5)
    assert attn.o_proj.weight.shape[1] == HEADS * 5 and report.params_after < report.params_before
    assert attn.scaling != original_scale and pruned.config.clover_softmax_scale == original_scale
    assert close(logits(pruned, tokens), logits(model, tokens))
    assert [(lr.qk_dim, lr.vo_dim) for lr in report.layers] == [(6, 5), (6, 5)]
    assert any("softmax scale" in n for n in report.notes)


def test_without_the_scale_fold_the_pruned_model_would_differ(tokens):
    """The control for the test above: the stock scale of the smaller head dim alone would change the logits."""
    model = with_dead_dims(tiny_deepseek(), qk_dead=6, vo_dead=0)
    pruned, _ = prune(model, PruneConfig(qk_ratio=0.5, criterion="clover", progress=False))
    assert close(logits(pruned, tokens), logits(model, tokens))
    fold = ((6 + ROPE) / (NOPE + ROPE)) ** 0.5  # sqrt(new qk_head_dim / original): new scale * fold = original
    assert pruned.model.layers[0].self_attn.scaling * fold == pytest.approx(pruned.config.clover_softmax_scale)
    with torch.no_grad():
        for layer in pruned.model.layers:
            layer.self_attn.q_proj.weight /= fold
    assert not close(logits(pruned, tokens), logits(model, tokens), tol=1e-3)


def test_calibration_whitens_each_side_with_its_own_input(calibration):
    model = tiny_deepseek(q_lora_rank=16)
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    stats = collect(model, adapter, sites, calibration, head_outputs=True, progress=False)
    site = stats.sites[sites[0].name]
    assert site.q_input.shape == (17, 17) and site.kv_input.shape == (25, 25)  # q latent / kv latent, plus the 1
    assert site.head_output.shape == (HEADS, V_DIM, V_DIM) and stats.tokens == calibration.numel()


def test_save_reload_with_stock_classes_and_generate(tmp_path, tokens, calibration):
    model = tiny_deepseek(q_lora_rank=16)
    with pytest.warns(UserWarning, match="even qk_nope_head_dim"):  # 12 * 0.75 = 9 is raised to 10
        pruned, report = prune(model, PruneConfig(qk_ratio=0.25, vo_ratio=0.3, criterion="whitened",
                                                  calibration=calibration, progress=False))
    assert [(lr.qk_dim, lr.vo_dim) for lr in report.layers] == [(10, 7), (10, 7)]
    save_model(pruned, None, tmp_path / "p", report=report.to_dict())
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and "auto_map" not in config
    assert not list((tmp_path / "p").glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert type(reloaded) is DeepseekV2ForCausalLM and reloaded.config.qk_nope_head_dim == 10
    assert torch.equal(logits(reloaded, tokens), logits(pruned, tokens))
    prompt = tokens[:1, :6]
    cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 12) and torch.equal(cached, uncached)
    # reloaded, the adapter still sees the logical weights: pruning again composes
    again, _ = prune(reloaded, PruneConfig(qk_ratio=0.0, vo_threshold=0.0, criterion="clover", progress=False))
    assert close(logits(again, tokens), logits(reloaded, tokens))


def test_moe_and_every_non_attention_weight_is_untouched(calibration):
    model = tiny_deepseek()
    pruned, report = prune(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.5, criterion="clover", progress=False))
    source, new = model.state_dict(), pruned.state_dict()
    assert set(source) == set(new)
    experts = [k for k in source if ".mlp.experts." in k or ".mlp.gate." in k]
    assert experts
    for name in source:
        if not name.endswith(ATTENTION_WEIGHTS):
            assert torch.equal(source[name], new[name]), name
    # transformers caches MLA's latent, so the KV cache is honestly reported as unchanged
    assert report.kv_bytes_per_token_before == report.kv_bytes_per_token_after == 2 * (24 + ROPE) * 4


def test_threshold_gives_every_layer_the_largest_rank_any_needs(tokens):
    model = with_dead_dims(tiny_deepseek(), qk_dead=3, vo_dead=0)
    with torch.no_grad():  # layer 1 loses more: uniform dims must follow layer 0
        model.model.layers[1].self_attn.kv_b_proj.weight.view(HEADS, NOPE + V_DIM, -1)[:, :NOPE][:, 4:] = 0
    with pytest.warns(UserWarning, match="largest any needs"):
        pruned, report = prune(model, PruneConfig(qk_threshold=1e-6, criterion="clover", progress=False))
    assert [lr.qk_dim for lr in report.layers] == [10, 10] and pruned.config.qk_nope_head_dim == 10
    assert close(logits(pruned, tokens), logits(model, tokens))  # every live direction is kept in both layers


@pytest.mark.parametrize("kw, message", [
    (dict(allocation="global", qk_ratio=0.5), "--allocation uniform"),
    (dict(qk_ratio=0.5, qk_criterion="rotary-weight"), "rotary embeddings only"),
])
def test_bad_prune_settings_are_clear_errors(kw, message):
    with pytest.raises(CloverError, match=message):
        prune(tiny_deepseek(), PruneConfig(progress=False, **kw))


def test_unsupported_variants_name_what_was_found_and_change_nothing():
    model = tiny_deepseek(num_key_value_heads=2)
    with pytest.raises(CloverError, match="num_key_value_heads=2.*supports"):
        orthogonalize_(model, OrthogonalizeConfig(progress=False))

    model = tiny_deepseek()  # layer 0 is fine, layer 1 is not: layer 0 must not be rewritten either
    foreign = torch.nn.Module()
    foreign.kv_b_proj = torch.nn.Linear(24, 88, bias=False)
    model.model.layers[1].self_attn = foreign
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for run in (lambda: orthogonalize_(model, OrthogonalizeConfig(progress=False)),
                lambda: prune(model, PruneConfig(vo_ratio=0.5, progress=False))):
        with pytest.raises(CloverError, match="layers.1.self_attn is a torch.nn.modules.module.Module.*supports"):
            run()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)


def test_cli_prunes_a_local_deepseek_and_it_reloads(tmp_path, tokens):
    path = tmp_path / "deepseek"
    tiny_deepseek(vocab_size=300).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    result = CliRunner().invoke(app, ["prune", str(path), "--out", str(tmp_path / "p"), "--qk-ratio", "0.5",
                                      "--vo-ratio", "0.5", "--criterion", "clover", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(lr["qk_dim"], lr["vo_dim"]) for lr in report["layers"]] == [(6, 5), (6, 5)]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert type(reloaded) is DeepseekV2ForCausalLM and reloaded.config.v_head_dim == 5
    result = CliRunner().invoke(app, ["prune", str(path), "--out", str(tmp_path / "g"), "--qk-ratio", "0.5",
                                      "--criterion", "clover", "--allocation", "global"])
    assert result.exit_code == 2 and "--allocation uniform" in result.output
    assert not (tmp_path / "g").exists()


@pytest.mark.skipif(not DATA, reason="WikiText-2 not found (set CLOVER_DATA)")
def test_cli_whitened_prune_calibrates_on_the_latent(tmp_path):
    path = tmp_path / "deepseek"
    tiny_deepseek(vocab_size=300, q_lora_rank=16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    result = CliRunner().invoke(app, ["prune", str(path), "--out", str(tmp_path / "p"), "--vo-ratio", "0.3",
                                      "--qk-ratio", "0.5", "--calib-samples", "2", "--calib-seqlen", "32",
                                      "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["qk_criterion"] == "whitened" and report["calibration_tokens"] == 64
