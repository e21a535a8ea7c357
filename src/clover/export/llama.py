"""The ``llama`` GGUF architecture: LLaMA-family models (and Mistral without a sliding window), as llama.cpp reads
them. llama.cpp rotates adjacent pairs (its NORM rope), transformers rotates halves: the q and k rows of every head
are permuted from halves to pairs, as llama.cpp's own converter does."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..errors import CloverError

ARCH = "llama"
TYPES = ("llama", "mistral")


def halves_to_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (f, f + d/2) to adjacent pairs (2f, 2f + 1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check(config) -> None:
    if config.model_type not in TYPES:
        raise CloverError(f"the llama GGUF architecture takes {', '.join(TYPES)} models, not {config.model_type!r}")
    if getattr(config, "sliding_window", None):
        raise CloverError("this model uses sliding-window attention, which the llama GGUF architecture does not "
                          "apply: export a model without a sliding window")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise CloverError("the llama GGUF architecture has no bias tensors: export a model without biases")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CloverError(f"RoPE scaling {rope.get('rope_type')!r} is not exported (llama.cpp would need its own "
                          "scaling settings): refused rather than approximated")


def metadata(config, head_dim: int) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return {
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads or config.num_attention_heads,
        "rope.freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps), "rope.dimension_count": head_dim,
        "attention.key_length": head_dim, "attention.value_length": head_dim, "vocab_size": config.vocab_size,
    }


NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
         "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
         "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}


def tensors(state: dict[str, torch.Tensor], config) -> Iterator[tuple[str, np.ndarray, bool]]:
    """(GGUF name, float32 array, must stay float32) for every tensor llama.cpp reads."""
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    yield "token_embd.weight", _np(state["model.embed_tokens.weight"]), False
    yield "output_norm.weight", _np(state["model.norm.weight"]), True
    if not config.tie_word_embeddings:
        yield "output.weight", _np(state["lm_head.weight"]), False
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf, name in NAMES.items():
            weight = state[prefix + hf]
            if hf == "self_attn.q_proj.weight":
                weight = halves_to_pairs(weight, heads)
            elif hf == "self_attn.k_proj.weight":
                weight = halves_to_pairs(weight, kv_heads)
            yield f"blk.{i}.{name}", _np(weight), weight.dim() == 1


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()
