"""The ``deepseek2`` GGUF architecture for clover's MLA conversions, with the MLA metadata, so llama.cpp keeps only
the normalised latent and the rotated shared key in its cache (no V cache: values are a view of the latent).

What differs from the transformers checkpoint, and why it stays exact:
- ``q_lora_rank`` is written as 0: llama.cpp then reads ``attn_q`` directly for any layer count (it only asks for the
  key on non-"lite" layer counts, and a rank of 0 means no query LoRA).
- ``kv_b_proj`` is split per head into ``attn_k_b`` (absorbed into the queries) and ``attn_v_b`` (expands the
  attention result), the layout llama.cpp's absorbed MLA reads.
- llama.cpp normalises the latent with the model's RMS epsilon, transformers with 1e-6: the norm weight that makes
  the (tiny, linear by construction) latent norm hand on the latent itself is ``sqrt(eps) / c``, so it is rescaled.
- llama.cpp needs ``qk_nope_head_dim >= 1``: a conversion with none (one KV head) gets one zero dim, and the query
  rows the new softmax scale ``1 / sqrt(nope + rope)`` would change are rescaled back.
- The latent rows of ``attn_kv_a_mqa`` are scaled far below the norm's epsilon, below what f16 or q8_0 can hold:
  that tensor stays float32 in every file type.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import CloverError

ARCH = "deepseek2"
HF_KV_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default (kv_a_layernorm)


def check(config) -> None:
    if config.model_type != "deepseek_v3" or not getattr(config, "clover_linear_latent_norm", False):
        raise CloverError("the deepseek2 GGUF export takes clover's MLA conversions (clover mla), whose latent norm is "
                          "linear by construction; convert the model with clover mla first")
    if config.q_lora_rank is not None or config.first_k_dense_replace != config.num_hidden_layers:
        raise CloverError("this DeepSeek-V3 checkpoint has a query LoRA or MoE layers, which clover's MLA "
                          "conversions never have: export only what clover mla wrote")
    if config.rms_norm_eps < 1e-8:
        raise CloverError(f"rms_norm_eps {config.rms_norm_eps} is too small for the linear latent norm's margin in "
                          "llama.cpp (which uses it for the latent norm too)")


def nope_dims(config) -> int:
    return max(config.qk_nope_head_dim, 1)


def metadata(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rank, rope_dims, nope = config.kv_lora_rank, config.qk_rope_head_dim, nope_dims(config)
    return {
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads, "attention.head_count_kv": 1,
        "rope.freq_base": float(rope.get("rope_theta", 10000.0)),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps), "rope.dimension_count": rope_dims,
        "leading_dense_block_count": config.num_hidden_layers, "vocab_size": config.vocab_size,
        "attention.q_lora_rank": 0, "attention.kv_lora_rank": rank,
        "attention.key_length": rank + rope_dims, "attention.value_length": rank,
        "attention.key_length_mla": nope + rope_dims, "attention.value_length_mla": config.v_head_dim,
        "expert_feed_forward_length": config.moe_intermediate_size, "expert_shared_count": 0,
        "expert_gating_func": 2,  # sigmoid (DeepSeek-V3's); unused by dense layers, but llama.cpp defaults to softmax
    }


NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
         "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}


def tensors(state: dict[str, torch.Tensor], config) -> Iterator[tuple[str, np.ndarray, bool]]:
    """(GGUF name, float32 array, must stay float32) for every tensor llama.cpp reads."""
    heads, rank = config.num_attention_heads, config.kv_lora_rank
    nope, rope_dims, v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    pad = nope_dims(config) - nope
    rescale = math.sqrt((nope + pad + rope_dims) / (nope + rope_dims))  # the padded key changes the softmax scale
    yield "token_embd.weight", _np(state["model.embed_tokens.weight"]), False
    yield "output_norm.weight", _np(state["model.norm.weight"]), True
    if not config.tie_word_embeddings:
        yield "output.weight", _np(state["lm_head.weight"]), False
    norm_scale = math.sqrt(config.rms_norm_eps / HF_KV_NORM_EPS)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf, name in NAMES.items():
            weight = state[prefix + hf]
            yield f"blk.{i}.{name}", _np(weight), weight.dim() == 1 or "kv_a_proj" in hf
        q = state[prefix + "self_attn.q_proj.weight"].reshape(heads, nope + rope_dims, -1) * rescale
        q = torch.cat([q[:, :nope], q.new_zeros(heads, pad, q.shape[-1]), q[:, nope:]], dim=1)
        yield f"blk.{i}.attn_q.weight", _np(q.reshape(-1, q.shape[-1])), False
        yield f"blk.{i}.attn_kv_a_norm.weight", _np(state[prefix + "self_attn.kv_a_layernorm.weight"] * norm_scale), \
            True
        kv_b = state[prefix + "self_attn.kv_b_proj.weight"].reshape(heads, nope + v_dim, rank)
        k_b = torch.cat([kv_b[:, :nope], kv_b.new_zeros(heads, pad, rank)], dim=1)  # (H, nope, r)
        yield f"blk.{i}.attn_k_b.weight", _np(k_b.transpose(1, 2)), False  # ggml (nope, r, H): q absorbed per head
        yield f"blk.{i}.attn_v_b.weight", _np(kv_b[:, nope:]), False  # ggml (r, v, H): latent -> value per head


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy().copy()
