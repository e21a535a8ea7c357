"""Latent-attention LLaMA (``clover_latent_llama``, written by ``clover latent``): CLOVER on top of the conversion.

Every head reads the layer's one value latent and writes through its own block of ``o_proj``, so V-O is a
multi-query pair: one KV group of all heads, value width ``v_rank``. Its CLOVER rewrite (orthogonalize, prune with
any criterion, fine-tune the d x d core) is exact, as for any GQA group. Keys are another matter: the shared rotary
components sit under RoPE, the rest of the key is rebuilt from a pre-RoPE latent, so no change of basis of Q-K is
exact here; the key budget is what ``clover latent --kv-ratio`` sets. This adapter therefore exposes V-O only
(Q-K is read as empty and never written) and the MLP up blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..pairs import AttentionWeights, Projection
from .base import Adapter, AttentionSite, linear_projection, write_linear

QK_REASON = ("keys are held as shared rotary components and a pre-RoPE latent, not as per-head Q-K pairs: set the "
             "key budget with `clover latent --kv-ratio`")


class LatentLlamaAdapter(Adapter):
    name = "latent_llama"
    model_types = ("clover_latent_llama",)
    prune_notes = ("latent model: V-O pruned per layer over the shared value latent; keys kept as converted",)

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        heads = model.config.num_attention_heads
        return [AttentionSite(name, module.layer_idx, module, heads, 1, qk_inexact=QK_REASON)
                for name, module in model.named_modules() if name.endswith("self_attn") and hasattr(module, "v_down")]

    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        # q / k: the module that reads the attention input, so calibration sees it (no Q-K statistic is used).
        attn = site.module
        return {"q": attn.v_down, "k": attn.v_down, "v": attn.v_down, "o": attn.o_proj}

    def read(self, site: AttentionSite) -> AttentionWeights:
        attn = site.module
        weight = attn.v_down.weight.detach()
        empty = Projection(weight.new_zeros(0, weight.shape[1]), None)
        return AttentionWeights(empty, empty, linear_projection(attn.v_down), linear_projection(attn.o_proj),
                                site.num_heads, 1)

    def write(self, site: AttentionSite, weights: AttentionWeights) -> None:
        """V and O only: the empty Q-K view of ``read`` is never rewritten."""
        write_linear(site.module.v_down, weights.v)
        write_linear(site.module.o_proj, weights.o)
        site.module.v_rank = weights.v.weight.shape[0]

    def cache_width(self, site: AttentionSite, weights: AttentionWeights) -> int:
        attn = site.module
        return 2 * attn.components + attn.k_rank + weights.v.weight.shape[0]

    def build_pruned(self, model: nn.Module, layers: list) -> nn.Module:
        """The same latent runtime with each layer's value latent at its new width; every other weight copied."""
        settings = model.config.to_dict()
        v_ranks = list(model.config.v_ranks)
        for lr in layers:
            v_ranks[lr.layer] = lr.vo_dim
        settings = {k: v for k, v in settings.items() if k not in ("model_type", "transformers_version", "auto_map")}
        settings["v_ranks"] = v_ranks
        config = type(model.config)(**settings)
        reference = next(model.parameters())
        pruned = type(model)(config).to(device=reference.device, dtype=reference.dtype)
        own, source = pruned.state_dict(), model.state_dict()
        with torch.no_grad():
            for name, tensor in own.items():
                if name in source and source[name].shape == tensor.shape:
                    tensor.copy_(source[name])
        return pruned.eval()

    def mlp_up(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.up_proj", m.up_proj) for name, m in model.named_modules()
                if name.endswith("mlp") and hasattr(m, "up_proj")]
