"""GGUF exports run in llama.cpp and give the logits clover's transformers models give (tiny models, every kind)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer
from typer.testing import CliRunner

import clover  # noqa: F401
from clover.cli import app
from clover.errors import CloverError
from clover.export import GgufConfig, engine, export_gguf
from clover.finetune.data import TokenWindows
from clover.heal import HealConfig, heal
from clover.mla import MlaConfig, to_mla
from clover.save import save_model
from clover.verify import model_outputs

if not engine.available():
    if os.environ.get("CI"):
        pytest.fail("llama-cpp-python is not installed: scripts/setup builds and installs it", pytrace=False)
    pytest.skip("llama-cpp-python not installed (scripts/setup installs it)", allow_module_level=True)

IDS = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
runner = CliRunner()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved folders: LLaMA with GQA and with one KV head, and their MLA conversions (KV 50% and full rank)."""
    root = tmp_path_factory.mktemp("export")
    found = {}
    for kv in (2, 1):
        model = tiny_llama(vocab_size=300, num_key_value_heads=kv)
        save_model(model, tiny_tokenizer(), root / f"llama{kv}")
        found[f"llama{kv}"] = (model, root / f"llama{kv}")
        ratio = 0.5 if kv == 2 else 0.0
        mla, _ = to_mla(model, MlaConfig(kv_ratio=ratio, calibration=CALIB, split=1.0, unrotated="nope",
                                         o_refit=False, progress=False))  # the rotary split alone
        save_model(mla, tiny_tokenizer(), root / f"mla{kv}")
        found[f"mla{kv}"] = (mla, root / f"mla{kv}")
    partial, _ = to_mla(found["llama2"][0], MlaConfig(kv_ratio=0.5, rope_dims=4, unrotated="refit", o_refit=True,
                                                      calibration=CALIB, split=1.0, progress=False))
    save_model(partial, tiny_tokenizer(), root / "mla2-rope4")  # every lever, partial RoPE: the fastest frequencies
    found["mla2-rope4"] = (partial, root / "mla2-rope4")  # (a theta of their own, which the engine must read)
    spread, _ = to_mla(found["llama2"][0], MlaConfig(kv_ratio=0.5, rope_dims=4, rope_frequencies="spread",
                                                     calibration=CALIB, split=1.0, progress=False))
    save_model(spread, tiny_tokenizer(), root / "mla2-rope4-spread")  # every 4th frequency, the original theta
    found["mla2-rope4-spread"] = (spread, root / "mla2-rope4-spread")
    healed, _ = heal(copy.deepcopy(partial), found["llama2"][0], None, TokenWindows(CALIB),
                     HealConfig(steps=4, lr=1e-2, seqlen=32, progress=False), root / "heal-run", log=lambda *_: None)
    save_model(healed, tiny_tokenizer(), root / "mla2-healed")  # per-head keys and values no longer shared
    found["mla2-healed"] = (healed, root / "mla2-healed")
    gqa, _ = to_mla(found["llama2"][0], MlaConfig(layout="gqa", kv_heads=1, calibration=CALIB, progress=False))
    save_model(gqa, tiny_tokenizer(), root / "gqa1")
    found["gqa1"] = (gqa, root / "gqa1")
    return found


@pytest.mark.parametrize("name", ["llama2", "llama1", "mla2", "mla1", "mla2-rope4", "mla2-rope4-spread", "mla2-healed",
                                  "gqa1"])
def test_llama_cpp_computes_what_transformers_computes(models, name, tmp_path):
    model, folder = models[name]
    report = export_gguf(model, str(folder), folder, tmp_path / "m.gguf", GgufConfig(type="f32"))
    assert report.architecture == ("deepseek2" if name.startswith("mla") else "llama")
    got = engine.logits(report.path, IDS)
    want = model_outputs(model, {"input_ids": IDS[None], "use_cache": False})[0]
    assert relative(got, want) < 1e-4  # float32 weights and cache: only the order of float32 sums differs


@pytest.mark.parametrize("file_type,tolerance", [("f16", 2e-2), ("q8_0", 2e-1)])
def test_smaller_types_load_and_stay_close(models, file_type, tolerance, tmp_path):
    model, folder = models["mla2"]
    report = export_gguf(model, str(folder), folder, tmp_path / "m.gguf", GgufConfig(type=file_type))
    assert report.kept_f32 == ["blk.0.attn_kv_a_mqa.weight", "blk.1.attn_kv_a_mqa.weight"]  # the scaled latent rows
    got = engine.logits(report.path, IDS)
    want = model_outputs(model, {"input_ids": IDS[None], "use_cache": False})[0]
    assert relative(got, want) < tolerance


def test_the_mla_file_caches_only_the_latent(models, tmp_path):
    """llama.cpp's MLA keeps kv_lora_rank + rope numbers per token and layer in K and nothing in V."""
    import gguf

    model, folder = models["mla2"]
    report = export_gguf(model, str(folder), folder, tmp_path / "m.gguf", GgufConfig(type="f32"))
    fields = gguf.GGUFReader(report.path).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("deepseek2.attention.head_count_kv") == 1
    assert value("deepseek2.attention.key_length") == model.config.kv_lora_rank + model.config.qk_rope_head_dim
    assert value("deepseek2.attention.value_length") == model.config.kv_lora_rank
    assert value("deepseek2.attention.q_lora_rank") == 0 and value("deepseek2.expert_gating_func") == 2


def test_what_no_writer_takes_is_refused(models, tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    stock = DeepseekV3ForCausalLM(DeepseekV3Config(vocab_size=300, hidden_size=64, intermediate_size=96,
                                                   moe_intermediate_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None,
                                                   qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                                                   first_k_dense_replace=2, n_routed_experts=2, n_group=1,
                                                   topk_group=1, num_experts_per_tok=1))
    with pytest.raises(CloverError, match="clover's MLA conversions"):
        export_gguf(stock, None, None, tmp_path / "x.gguf", GgufConfig(type="f32"))
    from clover.prune import PruneConfig, prune

    pruned, _ = prune(models["llama2"][0], PruneConfig(vo_ratio=0.5, criterion="clover", progress=False))
    with pytest.raises(CloverError, match="value length == key length"):  # llama.cpp's llama graph asserts it
        export_gguf(pruned, None, None, tmp_path / "x.gguf", GgufConfig(type="f32"))
    with pytest.raises(CloverError, match="unsupported GGUF type 'q4_k'"):
        export_gguf(models["llama2"][0], None, None, tmp_path / "x.gguf", GgufConfig(type="q4_k"))
    assert not list(tmp_path.iterdir())


def test_cli_exports_checks_and_refuses(models, tmp_path):
    _, folder = models["mla2"]
    out = tmp_path / "m.gguf"
    result = runner.invoke(app, ["export", str(folder), "--gguf", str(out), "--type", "f32", "--json",
                                 str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["architecture"] == "deepseek2" and report["check_relative_diff"] < 1e-4
    assert report["tokenizer"] == "built from tokenizer.json"
    for args, message in ((["--type", "f32"], "exists"), (["--type", "q2"], "unsupported GGUF type"),
                          (["--overwrite", "--type", "f32", "--json", str(tmp_path)], "is a folder")):
        result = runner.invoke(app, ["export", str(folder), "--gguf", str(out), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["export", str(folder), "--gguf", str(tmp_path / "m.bin")])
    assert result.exit_code == 2 and "should end in .gguf" in result.output
