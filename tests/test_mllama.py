"""Mllama (LLaMA-3.2-Vision) end to end on a tiny random model: vision encoder, rotary text self-attention with GQA,
and text cross-attention to the vision states.

The tiny model's tanh gates (zero at init in transformers) are set to one, so the vision encoder and the
cross-attention layer really move the logits and the lossless checks see every kind of block. There are no images
offline: inputs carry seeded random pixels, which is enough to test exactness and mechanics, not quality.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, MllamaConfig, MllamaForCausalLM, MllamaForConditionalGeneration

import clover  # noqa: F401  (registers the clover_* model types)
from clover.adapters import adapter_for
from clover.calibrate import collect
from clover.errors import CloverError
from clover.modeling import clover_mllama, task_of
from clover.orthogonalize import OrthogonalizeConfig, orthogonalize_
from clover.prune import PruneConfig, _targets, prune
from clover.save import save_model

INIT = 0.3
VISION = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
              vision_output_dim=96, image_size=28, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0, 1],
              supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], initializer_range=INIT)
TEXT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, cross_attention_layers=[1], max_position_embeddings=128, initializer_range=INIT,
            bos_token_id=0, eos_token_id=1, pad_token_id=2)
KINDS = ("vision", "text self", "text cross")


def tiny_mllama(seed: int = 0) -> MllamaForConditionalGeneration:
    config = MllamaConfig(vision_config=VISION, text_config=TEXT, image_token_index=TEXT["vocab_size"])
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                p.fill_(1.0)
    return model


def kind_of(site) -> str:
    return "vision" if "vision_model" in site.name else f"text {site.role}"


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def inputs():
    model = tiny_mllama()
    return adapter_for(model).example_inputs(model, batch=2, seqlen=12)


def test_sites_cover_the_three_kinds_with_their_layout():
    model = tiny_mllama()
    sites = adapter_for(model).sites(model)
    by_kind = {k: [s for s in sites if kind_of(s) == k] for k in KINDS}
    assert [len(by_kind[k]) for k in KINDS] == [3, 3, 1]  # 2 local + 1 global vision layers; text layer 1 is cross
    assert all(not s.rotary and not s.qk_inexact and s.num_kv_heads == 2 for s in by_kind["vision"])
    assert all(s.rotary and (s.num_heads, s.num_kv_heads) == (4, 2) for s in by_kind["text self"])
    cross = by_kind["text cross"][0]
    assert (cross.num_heads, cross.num_kv_heads, cross.role) == (4, 2, "cross") and "q_norm" in cross.qk_inexact


def test_every_kind_of_block_moves_the_logits(inputs):
    """Guards the lossless checks below: a broken rewrite of any kind of block would show in the logits."""
    reference = logits(tiny_mllama(), inputs)
    for kind in KINDS:
        model = tiny_mllama()
        site = next(s for s in adapter_for(model).sites(model) if kind_of(s) == kind)
        with torch.no_grad():
            site.module.o_proj.weight.mul_(1.5)
        assert rel(logits(model, inputs), reference) > 1e-3, kind


def test_orthogonalize_is_exact_on_all_three_kinds(inputs):
    model = tiny_mllama()
    reference = logits(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = orthogonalize_(model, OrthogonalizeConfig(progress=False))
    assert report.check.passed and report.check.relative_diff < 1e-5
    assert rel(logits(model, inputs), reference) < 1e-5  # on other inputs than the built-in check's
    status = {(p.site, p.kind): p for p in report.pairs}
    sites = adapter_for(model).sites(model)
    for site in sites:
        qk, vo = status[site.name, "qk"], status[site.name, "vo"]
        assert vo.status == "rewritten"
        assert qk.status == ("rewritten" if kind_of(site) == "vision" else "skipped")
        if kind_of(site) == "text cross":
            assert "q_norm" in qk.reason
        # rewritten weights changed, skipped ones did not
        q_key = next(k for k in before if k.endswith(f"{site.name}.q_proj.weight"))
        v_key = q_key.replace("q_proj", "v_proj")
        assert torch.equal(before[q_key], model.state_dict()[q_key]) == (qk.status == "skipped")
        assert not torch.equal(before[v_key], model.state_dict()[v_key])
    # singular values are sorted per KV group: the rewrite really is the CLOVER basis
    for p in report.pairs:
        for group in p.singular_values:
            assert group == sorted(group, reverse=True)


CRITERIA = [("vanilla", "vanilla"), ("clover", "clover"), ("whitened", "whitened"),
            ("clover", "rotary-weight"), ("whitened", "rotary-activation")]


@pytest.mark.parametrize("criterion, qk_criterion", CRITERIA, ids=[f"{a}+{b}" for a, b in CRITERIA])
def test_prune_every_criterion_gives_physically_smaller_weights(criterion, qk_criterion, inputs):
    model = tiny_mllama()
    calibration = torch.randint(0, TEXT["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="kept at full width"):
        pruned, report = prune(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.5, criterion=criterion,
                                                  qk_criterion=qk_criterion, calibration=calibration,
                                                  progress=False))
    assert type(pruned).__name__ == "CloverMllamaForConditionalGeneration"
    rotary = qk_criterion.startswith("rotary")
    sites = {s.name: s for s in adapter_for(pruned).sites(pruned)}
    for name, site in sites.items():
        m, kind, head_dim = site.module, kind_of(site), 16
        qk_pruned = (kind == "text self") if rotary else (kind == "vision")
        assert m.k_proj.weight.shape[0] == site.num_kv_heads * (head_dim // 2 if qk_pruned else head_dim), name
        assert m.v_proj.weight.shape[0] == site.num_kv_heads * head_dim // 2, name
        assert m.o_proj.weight.shape[1] == site.num_heads * head_dim // 2, name
    assert report.params_after < report.params_before
    # text self-attention K/V only: (qk + vo) * kv_heads * 3 layers * 4 bytes
    assert report.kv_bytes_per_token_before == (16 + 16) * 2 * 3 * 4
    assert report.kv_bytes_per_token_after == ((8 if rotary else 16) + 8) * 2 * 3 * 4
    out = logits(pruned, inputs)
    assert torch.isfinite(out).all() and out.shape == logits(model, inputs).shape


def _zero_weak_directions(model) -> None:
    """Zero half of every head where the runtime may drop it: V channels 8..15 (and the matching O columns) of
    every block, Q/K channels 8..15 of the vision blocks, rotary frequency pairs 4..7 (channels 4..7 and 12..15) of
    the text self-attention. Cross-attention Q-K is left alone (it is never pruned)."""
    head, upper = 16, list(range(8, 16))
    qk_drop = {"vision": upper, "text self": [4, 5, 6, 7, 12, 13, 14, 15], "text cross": []}

    def rows(heads, channels):
        return torch.tensor([h * head + c for h in range(heads) for c in channels], dtype=torch.long)

    with torch.no_grad():
        for site in adapter_for(model).sites(model):
            m, drop = site.module, qk_drop[kind_of(site)]
            m.v_proj.weight[rows(site.num_kv_heads, upper)] = 0
            m.o_proj.weight[:, rows(site.num_heads, upper)] = 0
            m.q_proj.weight[rows(site.num_heads, drop)] = 0
            m.k_proj.weight[rows(site.num_kv_heads, drop)] = 0


@pytest.mark.parametrize("qk_criterion", ["vanilla", "rotary-weight"])
def test_pruned_runtime_computes_the_original_when_dropped_directions_are_zero(qk_criterion, inputs):
    """Pins the runtime down (head-major layout, separate Q-K / V-O widths, kept rotary pairs, original softmax
    scale, cross-attention values) without trusting clover's own check: same logits as the zeroed original."""
    model = tiny_mllama()
    _zero_weak_directions(model)
    reference = logits(model, inputs)
    with pytest.warns(UserWarning, match="kept at full width"):
        pruned, report = prune(model, PruneConfig(qk_ratio=0.5, vo_ratio=0.5, criterion="vanilla",
                                                  qk_criterion=qk_criterion, progress=False))
    assert rel(logits(pruned, inputs), reference) < 1e-5
    text_self = [lr for lr in report.layers if lr.site.endswith("self_attn") and "language_model" in lr.site]
    if qk_criterion == "rotary-weight":
        assert all(lr.rope_pairs == [[0, 1, 2, 3]] * 2 for lr in text_self)


def test_save_load_round_trip_and_generate(tmp_path, inputs):
    model = tiny_mllama()
    pruned, report = prune(model, PruneConfig(vo_ratio=0.5, progress=False))
    save_model(pruned, None, tmp_path / "out", report=report.to_dict())
    assert (tmp_path / "out" / "clover_mllama.py").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is type(pruned) and task_of(loaded) == "image_text_to_text"
    assert torch.equal(logits(loaded, inputs), logits(pruned, inputs))

    # the KV cache holds the pruned widths: text self K/V and the cross layer's vision values
    with torch.no_grad():
        cache = loaded(**inputs, use_cache=True).past_key_values
    assert cache.layers[0].keys.shape[-1] == 16 and cache.layers[0].values.shape[-1] == 8
    assert cache.layers[1].keys.shape[-1] == 16 and cache.layers[1].values.shape[-1] == 8
    # greedy decoding with the cache equals decoding without it
    cached = loaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    uncached = loaded.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 4) and torch.equal(cached, uncached)


def test_prune_twice_covers_vision_and_rotary_qk():
    """One Q-K criterion cannot fit both plain and rotary blocks; a second pass prunes the other kind."""
    model = tiny_mllama()
    with pytest.warns(UserWarning):
        once, _ = prune(model, PruneConfig(qk_ratio=0.5, criterion="clover", progress=False))
        twice, report = prune(once, PruneConfig(qk_ratio=0.5, qk_criterion="rotary-weight", progress=False))
    widths = {lr.site: lr.qk_dim for lr in report.layers}
    assert all(w == 8 for s, w in widths.items() if not s.endswith("cross_attn"))
    assert widths["model.language_model.layers.1.cross_attn"] == 16


def test_calibration_sees_the_vision_states_in_cross_attention():
    model = tiny_mllama()
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    stats = collect(model, adapter, sites, torch.randint(0, 128, (2, 8)), head_outputs=True, progress=False)
    cross = next(s for s in sites if s.role == "cross")
    st = stats.sites[cross.name]
    assert not torch.allclose(st.kv_input, st.q_input)  # K/V read the projected vision states, Q the text
    for site in sites:
        assert stats.sites[site.name].q_input is not None and stats.sites[site.name].head_output is not None


def test_qk_pruning_where_only_normed_qk_is_left_is_refused_not_approximated():
    model = tiny_mllama()
    cross = [s for s in adapter_for(model).sites(model) if s.role == "cross"]
    with pytest.raises(CloverError, match="q_norm.*prune V-O only"):
        _targets(cross, "qk", "clover", warn=lambda message: None)


def test_unsupported_variants_are_refused_before_anything_is_rewritten():
    text_only = MllamaForCausalLM(MllamaConfig(vision_config=VISION, text_config=TEXT).text_config)
    with pytest.raises(CloverError, match="'mllama_text_model'.*mllama"):
        orthogonalize_(text_only, OrthogonalizeConfig(progress=False))

    class ForeignAttention(nn.Module):
        def forward(self, hidden_states, **kwargs):
            return hidden_states, None

    model = tiny_mllama()
    model.model.language_model.layers[3].self_attn = ForeignAttention()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = "language_model.layers.3.self_attn is ForeignAttention.*supports MllamaTextSelfAttention"
    with pytest.raises(CloverError, match=message):
        orthogonalize_(model, OrthogonalizeConfig(progress=False))
    with pytest.raises(CloverError, match=message):
        prune(model, PruneConfig(vo_ratio=0.5, progress=False))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_modeling_file_is_self_contained():
    tree = ast.parse(Path(clover_mllama.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "torch", "transformers", "huggingface_hub"}


def test_runtime_config_refuses_a_narrower_cross_attention_qk():
    with pytest.raises(ValueError, match="cross-attention layer"):
        clover_mllama.CloverMllamaTextConfig(**{**TEXT, "qk_dims": [16, 8, 16, 16]})


@pytest.mark.filterwarnings("ignore:Q-K of .* kept at full width")
def test_cli_loads_the_full_model_and_prunes_it(tmp_path, inputs):
    """A saved Mllama directory loads as the vision-language model (not its text half) and prunes from the CLI."""
    from typer.testing import CliRunner

    from clover.cli import app
    from clover.models import load

    tiny_mllama().save_pretrained(tmp_path / "mllama")
    assert type(load(str(tmp_path / "mllama")).model) is MllamaForConditionalGeneration
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "mllama"), "--out", str(tmp_path / "pruned"),
                                      "--qk-ratio", "0.5", "--vo-ratio", "0.5", "--criterion", "clover",
                                      "--json", str(tmp_path / "report.json")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "vision_model.global_transformer.layers.*.self_attn 0" in result.output  # the table names the stacks
    layers = json.loads((tmp_path / "report.json").read_text())["layers"]
    assert {(lr["site"].split(".")[2], lr["qk_dim"], lr["vo_dim"]) for lr in layers} == {
        ("transformer", 8, 8), ("global_transformer", 8, 8), ("layers", 16, 8)}
    reloaded = load(str(tmp_path / "pruned")).model
    assert type(reloaded).__name__ == "CloverMllamaForConditionalGeneration"
    assert reloaded.model.vision_model.transformer.layers[0].self_attn.q_proj.weight.shape == (16, 32)
