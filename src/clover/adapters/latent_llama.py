"""Latent-attention LLaMA (``clover_latent_llama``, written by ``clover latent``): CLOVER on top of the conversion.

Every head reads the layer's one value latent and writes through its own block of ``o_proj``, so V-O is a
multi-query pair: one KV group of all heads, value width ``v_rank``. Its CLOVER rewrite (orthogonalize, prune with
any criterion, fine-tune the d x d core) is exact, as for any GQA group.

Q-K is the pair of ``q_rope`` and ``k_rope``, the shared rotary components (one multi-query group again, component
j in channels j and M + j, the rotate-half layout): like any Q-K under RoPE it is not rewritten exactly, but the
rotary-pair criteria prune whole components and the ``k`` fine-tuning target trains ``k_rope``. The pre-RoPE key
latent (``k_down`` / ``k_up``) is no per-head pair at all; its width is what ``clover latent --kv-ratio`` sets. A
layer without shared components therefore shows an empty Q-K and says why.
"""

from __future__ import annotations

from torch import nn

from ..pairs import AttentionWeights, Projection
from ..rebuild import copy_matching
from .base import Adapter, AttentionSite, linear_projection, write_linear

QK_REASON = ("keys are held as shared rotary components and a pre-RoPE latent, not as per-head Q-K pairs: set the "
             "key budget with `clover latent --kv-ratio`")


class LatentLlamaAdapter(Adapter):
    name = "latent_llama"
    model_types = ("clover_latent_llama",)
    prune_notes = ("latent model: V-O pruned per layer over the shared value latent; keys kept as converted",)

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        heads = model.config.num_attention_heads
        return [AttentionSite(name, module.layer_idx, module, heads, 1, rotary=bool(module.components),
                              qk_inexact="" if module.components else QK_REASON)
                for name, module in model.named_modules() if name.endswith("self_attn") and hasattr(module, "v_down")]

    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        # Without shared components, q / k name the module that reads the attention input, so calibration sees it.
        attn = site.module
        q, k = (attn.q_rope, attn.k_rope) if attn.components else (attn.v_down, attn.v_down)
        return {"q": q, "k": k, "v": attn.v_down, "o": attn.o_proj}

    def read(self, site: AttentionSite) -> AttentionWeights:
        attn = site.module
        if attn.components:
            q, k = linear_projection(attn.q_rope), linear_projection(attn.k_rope)
        else:
            weight = attn.v_down.weight.detach()
            q = k = Projection(weight.new_zeros(0, weight.shape[1]), None)
        return AttentionWeights(q, k, linear_projection(attn.v_down), linear_projection(attn.o_proj),
                                site.num_heads, 1)

    def write(self, site: AttentionSite, weights: AttentionWeights) -> None:
        """V and O, and the shared components' Q-K where the layer has them (an empty Q-K is never written)."""
        attn = site.module
        if attn.components:
            write_linear(attn.q_rope, weights.q)
            write_linear(attn.k_rope, weights.k)
        write_linear(attn.v_down, weights.v)
        write_linear(attn.o_proj, weights.o)

    def cache_width(self, site: AttentionSite, weights: AttentionWeights) -> int:
        attn = site.module
        return 2 * attn.components + attn.k_rank + weights.v.weight.shape[0]

    def build_pruned(self, model: nn.Module, layers: list) -> nn.Module:
        """The same latent runtime with each layer's value latent at its new width and the shared components the
        rotary criterion kept (``rope_pairs`` index the layer's current components); every other weight copied."""
        settings = model.config.to_dict()
        v_ranks = list(model.config.v_ranks)
        freqs = [list(f) for f in model.config.rope_freqs]
        for lr in layers:
            v_ranks[lr.layer] = lr.vo_dim
            if lr.rope_pairs is not None and freqs[lr.layer]:
                freqs[lr.layer] = [freqs[lr.layer][i] for i in lr.rope_pairs[0]]
        settings = {k: v for k, v in settings.items() if k not in ("model_type", "transformers_version", "auto_map")}
        settings.update(v_ranks=v_ranks, rope_freqs=freqs)
        config = type(model.config)(**settings)
        reference = next(model.parameters())
        pruned = type(model)(config).to(device=reference.device, dtype=reference.dtype)
        copy_matching(pruned, model.state_dict())
        return pruned.eval()

    def mlp_up(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.up_proj", m.up_proj) for name, m in model.named_modules()
                if name.endswith("mlp") and hasattr(m, "up_proj")]
