"""The real SmolLM2-135M (LLaMA, 9 query heads over 3 KV heads, RoPE): the marked tier CI still runs."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import clover  # noqa: F401
from clover.data import calibration_batches, load_rows
from clover.orthogonalize import OrthogonalizeConfig, orthogonalize_
from clover.prune import PruneConfig, prune
from clover.save import save_model
from clover.spectra import collect_spectra
from clover.verify import model_outputs

pytestmark = pytest.mark.real_model


def test_orthogonalize_is_lossless_on_smollm2(smollm2):
    model = copy.deepcopy(smollm2.model)
    report = orthogonalize_(model, OrthogonalizeConfig(progress=False))
    print(f"SmolLM2 orthogonalize: max |logit diff| {report.check.max_abs_diff:.3e}, "
          f"relative {report.check.relative_diff:.3e}")
    assert report.check.passed and report.check.relative_diff <= 1e-4
    counts = report.counts()
    assert counts == {"qk skipped": 30, "vo rewritten": 30}
    # one SVD per KV group: 3 groups of 64 directions, sorted
    s = torch.tensor(report.pairs[1].singular_values)
    assert s.shape == (3, 64) and bool((s[:, :-1] >= s[:, 1:]).all())


def test_spectra_of_every_layer(smollm2):
    rows = collect_spectra(smollm2.model, progress=False)
    assert len(rows) == 60 and {r.exact for r in rows if r.kind == "qk"} == {False}
    vo = [r for r in rows if r.kind == "vo"]
    assert all(1 <= k <= 64 for r in vo for k in r.energy_ranks(0.9))


def test_prune_save_load_generate(smollm2, tmp_path):
    rows = load_rows(split="validation")
    calib = calibration_batches(smollm2.tokenizer, rows, 2, 128)
    config = PruneConfig(qk_ratio=0.25, vo_ratio=0.5, criterion="whitened", qk_criterion="rotary-activation",
                         calibration=calib, progress=False)
    pruned, report = prune(smollm2.model, config)
    assert report.kv_bytes_per_token_after / report.kv_bytes_per_token_before == pytest.approx((48 + 32) / 128)
    inputs = {"input_ids": smollm2.tokenizer("The tower is 324 metres tall,", return_tensors="pt").input_ids}
    ref = model_outputs(pruned, inputs)
    save_model(pruned, smollm2.tokenizer, tmp_path / "p", report=report.to_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    # same weights; float32 kernels may round differently with another memory alignment
    assert (model_outputs(loaded, inputs) - ref).abs().max() <= 1e-6 * ref.abs().max()
    out = loaded.generate(inputs["input_ids"], max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8


def test_slice_smollm2_keeps_its_tied_head_and_reloads(smollm2, tmp_path):
    """SmolLM2 ties its head to the embedding: slicing keeps one table (a 504 x 504 map carries the final norm),
    the full-width rotation is exact, and the sliced model saves, reloads and generates."""
    from clover.slicing import SliceConfig, slice_

    calib = calibration_batches(smollm2.tokenizer, load_rows(split="validation"), 4, 256)
    sliced, report = slice_(smollm2.model, SliceConfig(ratio=0.125, calibration=calib, progress=False))
    print(f"SmolLM2 slice 12.5%: rotation check {report.check['relative_diff']:.2e}, params "
          f"{report.params_before:,} -> {report.params_after:,}, stream energy kept {report.energy_kept:.4f}")
    assert report.check["passed"]
    assert (report.hidden_before, report.hidden_after) == (576, 504)
    assert sliced.lm_head.weight.data_ptr() == sliced.model.embed_tokens.weight.data_ptr()
    assert report.params_after < 0.9 * report.params_before
    ids = calib[:1, :32]
    save_model(sliced, smollm2.tokenizer, tmp_path / "s")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    ref = model_outputs(sliced, {"input_ids": ids})
    assert ((model_outputs(loaded, {"input_ids": ids}) - ref).abs().max() / ref.abs().max()).item() < 1e-6
    out = loaded.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_mla_and_gqa_exports_run_in_llama_cpp_with_clover_s_perplexity(smollm2, tmp_path):
    """SmolLM2 -> MLA at KV 50% (stock DeepSeek-V3) and -> one KV head (stock llama), each and the original to a
    GGUF: llama.cpp's perplexity on the same WikiText-2 test windows is within 1% of transformers'."""
    import os

    from clover.data import load_text
    from clover.evaluate import _token_ids, perplexity
    from clover.export import GgufConfig, engine, export_gguf
    from clover.mla import MlaConfig, to_mla

    if not engine.available():
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed: scripts/setup builds and installs it")
        pytest.skip("llama-cpp-python not installed")
    calib = calibration_batches(smollm2.tokenizer, load_rows(split="validation"), 8, 256)
    ids = _token_ids(smollm2.tokenizer, load_text(split="test"))
    windows = ids[: 2 * 256].reshape(2, 256)
    mla, report = to_mla(smollm2.model, MlaConfig(kv_ratio=0.5, calibration=calib, split=4.0, progress=False))
    assert report.kv_lora_rank == 128 and report.kv_bytes_per_token_after * 2 == report.kv_bytes_per_token_before
    gqa, _ = to_mla(smollm2.model, MlaConfig(layout="gqa", kv_heads=1, calibration=calib, progress=False))
    for name, model in (("original", smollm2.model), ("mla", mla), ("gqa", gqa)):
        exported = export_gguf(model, "smollm2-135m", None, tmp_path / f"{name}.gguf", GgufConfig(type="f32"))
        assert exported.tokenizer == "carried from SmolLM2-135M-Instruct.Q4_1.gguf"
        ours = perplexity(model, smollm2.tokenizer, load_text(split="test"), seqlen=256, max_windows=2,
                          progress=False).ppl
        theirs = engine.perplexity(exported.path, windows)
        print(f"{name}: transformers {ours:.4f}, llama.cpp {theirs:.4f}")
        assert abs(theirs / ours - 1) < 0.01
        (tmp_path / f"{name}.gguf").unlink()
