"""Writing a converted model as a stock ``DeepseekV3ForCausalLM``: config, weights, and the latent norm made linear.

The format always RMS-normalises the latent (``kv_a_layernorm``), and no engine lets that be skipped. clover makes
it act linearly by construction: the latent rows of ``kv_a_proj_with_mqa`` are scaled by ``c`` so small that the
latent's mean square is at most ``1e-10`` of the norm's epsilon for any input (a bound from the weights, not from
data: the attention input is RMS-normalised, so ``||x||^2 <= D max(w_norm^2)``), and the norm weight is
``sqrt(eps) / c``: the norm then divides by ``sqrt(eps)`` up to a relative ``5e-11``, and hands ``kv_b`` the latent
itself. Every other tensor (embeddings, norms, MLPs, head) is the original's, copied by name; all layers are dense
(``first_k_dense_replace`` = layers), the query needs no LoRA in transformers (``q_lora_rank=None``), and the
softmax scale ``1 / sqrt(qk_nope + qk_rope)`` of the format is turned back into ``1 / sqrt(d)`` in the query rows.
With ``qk_rope_head_dim`` r below d, the format's rotary embedding turns its pairs by the original frequencies the
conversion kept rotated: its theta is the one that computes exactly those (``solve.engine_theta``).

In the model a conversion returns, every exact pair of the stock layout (each head's unrotated query against its key
rows of ``kv_b_proj``, its value rows against its block of ``o_proj``) is written in CLOVER's form, ``U sqrt(S)`` |
``V sqrt(S)`` (``balance_pairs``; the held-out split trials, which only read the function, skip it). The solve fixes
only each pair's product and leaves the split of scale between the two sides wherever it fell: a least-squares O
refit over a latent can put norms of 1e4 into ``o_proj`` against values of RMS 30. The function is the same either
way, but a tuner that steps by about the same size in every weight (LoRA under Adam) reaches the output through the
other side: a step on the small side is multiplied by the large one. From the raw split, LoRA healing diverged
within its first steps; from the balanced one it heals.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from ..adapters import adapter_for
from ..pairs import balanced, cast_like
from ..rebuild import copy_matching
from .solve import LayerMla, engine_theta

NORM_MARGIN = 1e-10  # latent mean square / norm epsilon, at most, for any input
KV_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, which kv_a_layernorm always uses


def mla_config(model: nn.Module, rank: int, nope: int, head_dim: int, rope: int,
               freqs: torch.Tensor) -> DeepseekV3Config:
    """``freqs``: the original frequencies the ``rope`` rotated dims turn by."""
    base = model.config
    theta = (getattr(base, "rope_parameters", None) or {}).get("rope_theta", getattr(base, "rope_theta", 10000.0))
    theta = engine_theta(theta, freqs, head_dim)
    layers = base.num_hidden_layers
    config = DeepseekV3Config(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
        moe_intermediate_size=base.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=base.num_attention_heads, num_key_value_heads=base.num_attention_heads,
        n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=layers, kv_lora_rank=rank, q_lora_rank=None, qk_rope_head_dim=rope,
        qk_nope_head_dim=nope, v_head_dim=head_dim, hidden_act=base.hidden_act,
        max_position_embeddings=base.max_position_embeddings, rms_norm_eps=base.rms_norm_eps,
        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
        tie_word_embeddings=base.tie_word_embeddings, rope_parameters={"rope_type": "default", "rope_theta": theta},
        rope_interleave=True, attention_bias=False, num_mtp_layers=0,
    )
    config.scoring_func = "sigmoid"  # llama.cpp's converter reads it for the (unused) router: the sigmoid gate
    config.clover_linear_latent_norm = True  # the latent norm divides by a constant (see above): exports rely on it
    return config


def latent_scale(layer: LayerMla, norm: nn.Module) -> float:
    """``c`` such that ``mean((c x @ down)^2) <= NORM_MARGIN * eps`` for every RMS-normalised input ``x``."""
    rank = layer.down.shape[1]
    widest = float(norm.weight.detach().double().abs().max()) ** 2 * layer.down.shape[0]  # max ||x||^2
    top = float(torch.linalg.matrix_norm(layer.down, ord=2)) ** 2
    return math.sqrt(NORM_MARGIN * KV_NORM_EPS * rank / max(top * widest, 1e-300))


def build(model: nn.Module, layers: list[LayerMla], rank: int, head_dim: int) -> DeepseekV3ForCausalLM:
    """The stock model holding ``layers``; ``model`` (the original) gives every tensor the conversion leaves."""
    nope, rope = layers[0].q_nope.shape[-1], layers[0].q_rope.shape[-1]
    config = mla_config(model, rank, nope, head_dim, rope, layers[0].rope_freqs)
    reference = next(model.parameters())
    config.dtype = reference.dtype
    mla = DeepseekV3ForCausalLM(config).to(device=reference.device, dtype=reference.dtype).eval()
    copy_matching(mla, model.state_dict())
    for block, original, layer in zip(mla.model.layers, model.model.layers, layers, strict=True):
        write_layer(block.self_attn, original, layer, head_dim)
    return mla


def write_layer(attn: nn.Module, original: nn.Module, layer: LayerMla, head_dim: int) -> None:
    """Write ``layer`` into one stock attention block ``attn``, in place; ``original``: the original model's decoder
    layer at the same depth (its input norm bounds the latent's scale); ``head_dim``: the original query/key width.
    The per-layer key/value split search rewrites one layer of a built model this way instead of building the whole
    model for each trial."""
    nope, rope = layer.q_nope.shape[-1], layer.q_rope.shape[-1]
    fold = math.sqrt((nope + rope) / head_dim)  # the format divides by sqrt(nope + rope), the model by sqrt(d)
    with torch.no_grad():
        q = torch.cat([layer.q_nope, layer.q_rope], dim=-1) * fold  # (H, D, nope + d)
        attn.q_proj.weight.copy_(q.permute(0, 2, 1).reshape(-1, q.shape[1]))
        scale = latent_scale(layer, original.input_layernorm)
        attn.kv_a_proj_with_mqa.weight.copy_(torch.cat([layer.down * scale, layer.k_rope], dim=1).T)
        attn.kv_a_layernorm.weight.fill_(math.sqrt(attn.kv_a_layernorm.variance_epsilon) / scale)
        kv = torch.cat([layer.up_k[None].expand(layer.up_v.shape[0], -1, -1), layer.up_v], dim=-1)  # (G, r, .)
        kv = kv.repeat_interleave(layer.group, dim=0)  # every head of a group reads its group's values
        attn.kv_b_proj.weight.copy_(kv.permute(0, 2, 1).reshape(-1, layer.down.shape[1]))
        attn.o_proj.weight.copy_(layer.o)


def balance_pairs(mla: DeepseekV3ForCausalLM) -> None:
    """Rewrite every head's Q-K (unrotated) and V-O pair of ``mla`` in CLOVER's form, in place; exact. A conversion
    with no unrotated dims (one KV head, every key dim rotated) is left as solved: clover's DeepSeek adapter reads
    only models that have a Q-K pair."""
    if mla.config.qk_nope_head_dim < 1:
        return
    adapter = adapter_for(mla)
    for site in adapter.sites(mla):
        weights = adapter.read(site)
        new = weights
        for kind in ("qk", "vo"):
            new, _ = balanced(new, kind)
        adapter.write(site, cast_like(new, weights))
