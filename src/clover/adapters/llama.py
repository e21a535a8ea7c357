"""LLaMA-family decoders (Llama, Mistral, Qwen2; SmolLM2 is a Llama): separate ``q/k/v/o_proj`` linears.

Rotary embeddings act on Q and K, so only V-O is an exact CLOVER rewrite here; Q-K is reported as
position-dependent. GQA is common (SmolLM2: 9 query heads over 3 KV heads); Qwen2 has Q/K/V biases.
"""

from __future__ import annotations

from torch import nn

from .base import AttentionSite, LinearsAdapter


class LlamaAdapter(LinearsAdapter):
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

    def mlp_up(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.up_proj", m.up_proj) for name, m in model.named_modules()
                if name.endswith("mlp") and hasattr(m, "up_proj")]
