"""LLaMA-family decoders (Llama, Mistral, Qwen2; SmolLM2 is a Llama): separate ``q/k/v/o_proj`` linears.

Rotary embeddings act on Q and K, so only V-O is an exact CLOVER rewrite here; Q-K is reported as
position-dependent. GQA is common (SmolLM2: 9 query heads over 3 KV heads); Qwen2 has Q/K/V biases.
"""

from __future__ import annotations

from torch import nn

from ..pairs import AttentionWeights
from .base import Adapter, AttentionSite, linear_projection, write_linear


class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "clover_llama")

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        cfg = model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return [
            AttentionSite(name, module.layer_idx, module, heads, kv_heads, rotary=True)
            for name, module in model.named_modules()
            if name.endswith("self_attn") and hasattr(module, "q_proj") and hasattr(module, "o_proj")
        ]

    def read(self, site: AttentionSite) -> AttentionWeights:
        m = site.module
        return AttentionWeights(
            linear_projection(m.q_proj), linear_projection(m.k_proj), linear_projection(m.v_proj),
            linear_projection(m.o_proj), site.num_heads, site.num_kv_heads,
        )

    def mlp_up(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.up_proj", m.up_proj) for name, m in model.named_modules()
                if name.endswith("mlp") and hasattr(m, "up_proj")]

    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        m = site.module
        return {"q": m.q_proj, "k": m.k_proj, "v": m.v_proj, "o": m.o_proj}

    def write(self, site: AttentionSite, weights: AttentionWeights) -> None:
        m = site.module
        for layer, p in ((m.q_proj, weights.q), (m.k_proj, weights.k), (m.v_proj, weights.v), (m.o_proj, weights.o)):
            write_linear(layer, p)
