"""LLaMA-family decoders (Llama, Mistral, Qwen2; SmolLM2 is a Llama): separate ``q/k/v/o_proj`` linears.

Rotary embeddings act on Q and K, so only V-O is an exact CLOVER rewrite here; Q-K is reported as
position-dependent. GQA is common (SmolLM2: 9 query heads over 3 KV heads); Qwen2 has Q/K/V biases.
"""

from __future__ import annotations

from torch import nn

from .base import AttentionSite, LinearsAdapter
from .residual import NormSite, Port, ResidualLayout


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

    def residual_layout(self, model: nn.Module) -> ResidualLayout:
        """Pre-norm blocks: ``input_layernorm`` feeds q/k/v, ``post_attention_layernorm`` the MLP; o_proj and
        down_proj write (with their biases where ``attention_bias`` / ``mlp_bias`` put one)."""
        state = model.state_dict()

        def bias(key: str) -> str | None:
            return key if key in state else None

        norms, writers = [], []
        for i in range(model.config.num_hidden_layers):
            p = f"model.layers.{i}"
            norms.append(NormSite(f"{p}.input_layernorm", f"{p}.input_layernorm.weight", None, tuple(
                Port(f"{p}.self_attn.{n}.weight", 1) for n in ("q_proj", "k_proj", "v_proj"))))
            norms.append(NormSite(f"{p}.post_attention_layernorm", f"{p}.post_attention_layernorm.weight", None,
                                  tuple(Port(f"{p}.mlp.{n}.weight", 1) for n in ("gate_proj", "up_proj"))))
            writers += [Port(f"{p}.self_attn.o_proj.weight", 0, bias(f"{p}.self_attn.o_proj.bias")),
                        Port(f"{p}.mlp.down_proj.weight", 0, bias(f"{p}.mlp.down_proj.bias"))]
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        final = NormSite("model.norm", "model.norm.weight", None, () if tied else (Port("lm_head.weight", 1),))
        return ResidualLayout("rms", ("model.embed_tokens.weight",), tuple(norms), final, tuple(writers),
                              "lm_head.weight", tied)
