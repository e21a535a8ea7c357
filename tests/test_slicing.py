"""Hidden-dimension slicing (``clover.slicing``): exact rotation, sliced runtimes, save/reload, composition with
prune / latent / fine-tune, and one-line refusals."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM

from clover import OrthogonalizeConfig, PruneConfig, SliceConfig, orthogonalize_, prune, slice_
from clover.errors import CloverError
from clover.save import save_model
from conftest import VOCAB, logits_without_clover, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))


def tiny_deepseek_moe(**kw):
    """Layer 0 dense, layer 1 MoE (routed experts + a shared expert), a query LoRA: every reader of the stream."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                    q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                    max_position_embeddings=128, initializer_range=0.3)
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(DeepseekV2Config(**{**settings, **kw})).eval()


FAMILIES = {
    "llama-gqa": lambda: tiny_llama(num_key_value_heads=2),
    "llama-tied-bias": lambda: tiny_llama(num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True),
    "qwen2-bias": tiny_qwen2,
    "gpt2": tiny_gpt2,
    "deepseek-v2-moe": tiny_deepseek_moe,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def sliced(model, ratio, **kw):
    return slice_(model, SliceConfig(ratio=ratio, calibration=CALIB, progress=False, **kw))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rotation_alone_is_exact(family):
    model = FAMILIES[family]()
    rotated, report = sliced(model, 0.0)
    assert report.hidden_after == report.hidden_before
    assert report.check["passed"]
    assert rel(logits(rotated), logits(model)) < 1e-4
    assert report.energy_kept == pytest.approx(1.0)


def test_deepseek_v2_lite_layout_without_query_lora():
    """DeepSeek-V2-Lite reads the stream with a plain q_proj (q_lora_rank null) next to kv_a_proj_with_mqa."""
    model = tiny_deepseek_moe(q_lora_rank=None)
    rotated, report = sliced(model, 0.0)
    assert report.check["passed"] and rel(logits(rotated), logits(model)) < 1e-4
    small, _ = sliced(model, 0.25)
    assert small.model.layers[1].self_attn.q_proj.weight.shape[1] == 48


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_slice_narrows_every_stream_matrix_and_reloads_with_and_without_clover(family, tmp_path):
    model = FAMILIES[family]()
    small, report = sliced(model, 0.25)
    assert (report.hidden_before, report.hidden_after) == (64, 48)
    assert small.get_input_embeddings().weight.shape[1] == 48
    assert report.params_after < report.params_before
    assert report.kv_bytes_per_token_after == report.kv_bytes_per_token_before  # keys and values keep their width
    assert small.config.tie_word_embeddings == model.config.tie_word_embeddings
    if small.config.tie_word_embeddings:
        assert small.lm_head.weight.data_ptr() == small.get_input_embeddings().weight.data_ptr()
    out = logits(small)
    assert torch.isfinite(out).all()
    save_model(small, None, tmp_path / "m", report=report.to_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert rel(logits(loaded), out) < 1e-6
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.generate(IDS[:, :5], **settings), small.generate(IDS[:, :5], **settings))
    if not small.config.model_type.startswith("clover_"):
        return  # a stock class: no remote code involved
    assert rel(logits_without_clover(tmp_path / "m", IDS, tmp_path), out) < 1e-6


@pytest.mark.parametrize("family", ["llama-tied-bias", "gpt2", "deepseek-v2-moe"])
def test_a_stream_of_lower_rank_slices_losslessly(family):
    """When every embedding and writer only writes inside a subspace, the principal directions find it and slicing
    down to it changes nothing. GPT-2 keeps one more coordinate, the stream's mean, which its norms skip."""
    from clover.adapters import adapter_for
    from clover.slicing.rewrite import turn

    model = FAMILIES[family]()
    layout = adapter_for(model).residual_layout(model)
    rank = 48 - (layout.norm == "layer")
    frame, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(3)))
    inside = frame[:, :rank] @ frame[:, :rank].mT
    state = model.state_dict()
    with torch.no_grad():
        for key in layout.embeddings:
            state[key].copy_(turn(state[key], 1, inside))
        for port in layout.writers:
            state[port.key].copy_(turn(state[port.key], port.axis, inside))
            if port.bias is not None:
                state[port.bias].copy_(state[port.bias] @ inside)
    small, report = sliced(model, 0.25)
    assert report.hidden_after == 48
    assert report.energy_kept == pytest.approx(1.0, abs=1e-9)
    assert rel(logits(small), logits(model)) < 1e-4


def test_width_is_rounded_to_the_kernel_multiple_and_the_report_says_so():
    model = tiny_llama(num_key_value_heads=2)
    _, report = sliced(model, 0.1)  # 64 * 0.9 = 57.6 -> 56
    assert report.hidden_after == 56
    assert any("multiple of 8" in n for n in report.notes)
    _, exact = sliced(model, 0.1, multiple_of=1)
    assert exact.hidden_after == 58


@pytest.mark.parametrize("family", ["llama-gqa", "llama-tied-bias", "gpt2", "deepseek-v2-moe"])
def test_slice_then_prune_with_clover(family):
    """CLOVER per head on the sliced model: its pairs are still exact (orthogonalize checks the logits), and pruning
    shrinks them further."""
    model = FAMILIES[family]()
    small, _ = sliced(model, 0.25)
    kwargs = dict(criterion="whitened", calibration=CALIB) if family != "deepseek-v2-moe" else dict(criterion="clover")
    twin = copy.deepcopy(small)
    assert orthogonalize_(twin, OrthogonalizeConfig(progress=False)).check.passed
    assert rel(logits(twin), logits(small)) < 1e-4
    pruned, report = prune(small, PruneConfig(vo_ratio=0.5, progress=False, **kwargs))
    assert report.params_after < report.params_before
    assert pruned.get_input_embeddings().weight.shape[1] == 48
    assert torch.isfinite(logits(pruned)).all()


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_prune_then_slice_keeps_the_pruned_heads(family):
    model = FAMILIES[family]()
    pruned, _ = prune(model, PruneConfig(vo_ratio=0.5, criterion="clover", progress=False))
    rotated, report = sliced(pruned, 0.0)
    assert report.check["passed"] and rel(logits(rotated), logits(pruned)) < 1e-4
    small, _ = sliced(pruned, 0.25)
    assert small.config.vo_dims == pruned.config.vo_dims and small.config.hidden_size == 48


@pytest.mark.parametrize("family", ["llama-tied-bias", "qwen2-bias", "gpt2"])
def test_slice_then_latent_then_reload(family, tmp_path):
    from clover.latent import LatentConfig, to_latent

    small, _ = sliced(FAMILIES[family](), 0.25)
    exact, _ = to_latent(small, LatentConfig(kv_ratio=0.0, calibration=CALIB, progress=False))
    assert rel(logits(exact), logits(small)) < 1e-4
    latent, _ = to_latent(small, LatentConfig(kv_ratio=0.5, calibration=CALIB, progress=False))
    save_model(latent, None, tmp_path / "kv")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kv").eval()
    for field in ("head_proj", "norm_dim", "norm_skip"):
        assert getattr(loaded.config, field, None) == getattr(small.config, field, None)
    assert rel(logits(loaded), logits(latent)) < 1e-6


@pytest.mark.parametrize("family", ["llama-tied-bias", "gpt2", "deepseek-v2-moe"])
def test_slice_then_finetune_and_merge(family):
    from clover.finetune import TuneConfig, attach, merge_

    small, _ = sliced(FAMILIES[family](), 0.25)
    ref = logits(small)
    attach(small, TuneConfig(targets=("vo",)))
    assert rel(logits(small), ref) < 1e-4  # unchanged at step 0
    cores = [p for p in small.parameters() if p.requires_grad]
    loss = small(input_ids=IDS, labels=IDS).loss
    loss.backward()
    with torch.no_grad():
        for p in cores:
            p -= 0.05 * p.grad
    moved = logits(small)
    merge_(small)
    assert rel(logits(small), moved) < 1e-4
    assert rel(moved, ref) > 1e-6


def test_bad_input_is_one_line():
    llama = tiny_llama(num_key_value_heads=2)
    cases = [
        (lambda: sliced(llama, 1.0), "in [0, 1)"),
        (lambda: sliced(llama, 0.01), "rounds to none"),
        (lambda: sliced(llama, 0.999, multiple_of=1), "at least 1 must stay"),
        (lambda: sliced(llama, 0.5, multiple_of=0), "--multiple-of"),
        (lambda: sliced(tiny_bert(), 0.25), "no folding rule"),
        (lambda: sliced(tiny_deepseek_moe(tie_word_embeddings=True), 0.25), "tied embeddings"),
        (lambda: slice_(llama, SliceConfig(ratio=0.25, calibration=CALIB[:1, :16], progress=False)),
         "fewer than the hidden size"),
        (lambda: slice_(llama, SliceConfig(ratio=0.25, progress=False)), "calibration"),
    ]
    for call, message in cases:
        with pytest.raises(CloverError, match=re.escape(message)):
            call()
    tied_once, _ = sliced(tiny_llama(num_key_value_heads=2, tie_word_embeddings=True), 0.0)
    with pytest.raises(CloverError, match="already sliced"):
        sliced(tied_once, 0.25)


def test_cli_slice_prune_and_bad_input(tmp_path):
    """``clover slice`` then ``clover prune`` on its output; bad input exits 2 and writes nothing."""
    from typer.testing import CliRunner

    from clover.cli import app
    from conftest import DATA
    from tiny_tokenizer import tiny_tokenizer

    if DATA is None:
        pytest.skip("no local WikiText-2 (CLOVER_DATA)")
    tokenizer = tiny_tokenizer()
    base = tmp_path / "base"
    tiny_llama(num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True).save_pretrained(base)
    tokenizer.save_pretrained(base)
    calib = ["--calib-samples", "4", "--calib-seqlen", "32"]
    runner = CliRunner()
    done = runner.invoke(app, ["slice", str(base), "--ratio", "0.25", *calib, "--eval-ppl", "--seqlen", "32",
                               "--max-windows", "4", "--out", str(tmp_path / "s"), "--json", str(tmp_path / "s.json")])
    assert done.exit_code == 0, done.output
    assert "64 -> 48" in done.output and "WikiText-2 test ppl" in done.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.hidden_size == 48
    done = runner.invoke(app, ["prune", str(tmp_path / "s"), "--vo-ratio", "0.5", "--criterion", "whitened", *calib,
                               "--out", str(tmp_path / "s-vo50")])
    assert done.exit_code == 0, done.output
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "s-vo50")
    assert pruned.config.hidden_size == 48 and pruned.config.vo_dims == [8, 8]

    tiny_bert().save_pretrained(tmp_path / "bert")
    for args, message in [
        ([str(base), "--ratio", "1.5"], "[0, 1)"),
        ([str(base), "--ratio", "0.25", "--calib-samples", "1", "--calib-seqlen", "16"], "hidden size 64"),
        ([str(tmp_path / "bert"), "--ratio", "0.25"], "no folding rule"),
        ([str(tmp_path / "s"), "--ratio", "0.25", *calib], "already sliced"),
    ]:
        out = tmp_path / "never"
        done = runner.invoke(app, ["slice", *args, "--out", str(out), "--json", str(tmp_path / "never.json")])
        assert done.exit_code == 2, (args, done.output)
        assert message in done.output, (args, done.output)
        assert len(done.output.strip().splitlines()) == 1, done.output
        assert not out.exists() and not (tmp_path / "never.json").exists()
