"""Mllama (LLaMA-3.2-Vision): three kinds of attention block, all with separate ``q/k/v/o_proj`` linears, no biases.

- Vision encoder (``vision_model.transformer`` and the gated ``global_transformer``): plain multi-head
  self-attention, no rotary embeddings, so both Q-K and V-O are exact CLOVER rewrites.
- Text self-attention (``language_model.layers[i].self_attn``): rotary embeddings, GQA. Only V-O is exact; Q-K can
  be pruned by whole rotary frequency pairs, as for LLaMA.
- Text cross-attention (``language_model.layers[i].cross_attn`` for ``i`` in ``cross_attention_layers``): Q from
  the text, K and V from the projected vision states (``role="cross"``), GQA. An RMSNorm with a learned
  per-channel weight acts on each q and k head (``q_norm``/``k_norm``), so a change of basis of the Q-K pair is
  not exact there; V-O is.

Only the full model (``model_type="mllama"``: ``MllamaForConditionalGeneration`` or ``MllamaModel``) is understood;
anything else with a different layout is refused before a single weight is touched.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.mllama.modeling_mllama import (
    MllamaTextCrossAttention,
    MllamaTextSelfAttention,
    MllamaVisionAttention,
)

from ..errors import CloverError
from .base import AttentionSite, LinearsAdapter

QK_NORM_REASON = (
    "an RMSNorm with a per-channel weight (q_norm/k_norm) acts on each q and k head between the projections and "
    "the scores, so no change of basis of Q-K is exact; V-O is rewritten instead"
)


def _core(model: nn.Module) -> nn.Module:
    """The ``MllamaModel`` holding ``vision_model`` and ``language_model`` (the model itself or ``model.model``)."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "vision_model") and hasattr(candidate, "language_model"):
            return candidate
    raise CloverError(
        f"this {type(model).__name__} has no vision_model and language_model: the mllama adapter supports "
        "MllamaForConditionalGeneration and MllamaModel; load the full LLaMA-3.2-Vision checkpoint"
    )


def _expect(module: nn.Module | None, cls: type, where: str) -> nn.Module:
    if not isinstance(module, cls):
        found = "nothing" if module is None else type(module).__name__
        raise CloverError(
            f"unsupported Mllama variant: {where} is {found}, the mllama adapter supports {cls.__name__} there "
            "(transformers' Mllama layout); load the model with the stock transformers classes"
        )
    return module


class MllamaAdapter(LinearsAdapter):
    name = "mllama"
    model_types = ("mllama", "clover_mllama")
    prunes_cross_attention = True

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        """Every attention block, validated against the layout this adapter knows before anything is read."""
        core = _core(model)
        prefix = "" if core is model else "model."
        vision, text = core.vision_model, core.language_model
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        sites = []
        for stack in ("transformer", "global_transformer"):
            encoder = getattr(vision, stack, None)
            if encoder is None:
                raise CloverError(f"unsupported Mllama variant: {prefix}vision_model has no {stack}; the mllama "
                                  "adapter supports vision models with a local and a global transformer")
            for i, layer in enumerate(encoder.layers):
                name = f"{prefix}vision_model.{stack}.layers.{i}.self_attn"
                attn = _expect(getattr(layer, "self_attn", None), MllamaVisionAttention, name)
                sites.append(AttentionSite(name, i, attn, vcfg.attention_heads, vcfg.attention_heads))
        cross = set(tcfg.cross_attention_layers)
        heads, kv_heads = tcfg.num_attention_heads, tcfg.num_key_value_heads
        for i, layer in enumerate(text.layers):
            if i in cross:
                name = f"{prefix}language_model.layers.{i}.cross_attn"
                attn = _expect(getattr(layer, "cross_attn", None), MllamaTextCrossAttention, name)
                sites.append(AttentionSite(name, i, attn, heads, kv_heads, role="cross", qk_inexact=QK_NORM_REASON))
            else:
                name = f"{prefix}language_model.layers.{i}.self_attn"
                attn = _expect(getattr(layer, "self_attn", None), MllamaTextSelfAttention, name)
                sites.append(AttentionSite(name, i, attn, heads, kv_heads, rotary=True))
        return sites

    def caches_per_token(self, site: AttentionSite) -> bool:
        """Only the text self-attention caches K and V per token; the vision encoder caches nothing and the
        cross-attention layers cache the vision states once per image."""
        return site.role == "self" and ".language_model." in f".{site.name}"

    def example_inputs(self, model: nn.Module, batch: int = 2, seqlen: int = 32, seed: int = 0) -> dict:
        """Random text with an image token first and one random image per row, so every vision and cross block
        takes part in the lossless check."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.text_config.vocab_size, (batch, seqlen - 1), generator=gen)
        return self._with_image(model, ids, gen)

    def calibration_inputs(self, model: nn.Module, input_ids: torch.Tensor) -> dict:
        """Calibration text with an image token in front and a seeded random image (no images offline: the vision
        and cross-attention statistics exercise the mechanics, they are not representative of real photos)."""
        gen = torch.Generator().manual_seed(int(input_ids.sum().item()))
        return self._with_image(model, input_ids.cpu(), gen)

    @staticmethod
    def _with_image(model: nn.Module, ids: torch.Tensor, gen: torch.Generator) -> dict:
        cfg, vcfg = model.config, model.config.vision_config
        batch = ids.shape[0]
        ratio_id, tiles = _widest_aspect_ratio(vcfg.supported_aspect_ratios, vcfg.max_num_tiles)
        image = torch.full((batch, 1), cfg.image_token_index, dtype=ids.dtype)
        ids = torch.cat([image, ids], dim=1)
        param = next(model.parameters())
        pixels = torch.randn(batch, 1, vcfg.max_num_tiles, vcfg.num_channels, vcfg.image_size, vcfg.image_size,
                             generator=gen)
        tile_mask = (torch.arange(vcfg.max_num_tiles) < tiles).long()
        return {
            "input_ids": ids.to(param.device),
            "pixel_values": pixels.to(device=param.device, dtype=param.dtype),
            "aspect_ratio_ids": torch.full((batch, 1), ratio_id, dtype=torch.long, device=param.device),
            "aspect_ratio_mask": tile_mask.expand(batch, 1, -1).to(param.device),
            # every token (the image token onwards, i.e. all) attends to every used tile of the image
            "cross_attention_mask": tile_mask.expand(batch, ids.shape[1], 1, -1).to(param.device),
        }


def _widest_aspect_ratio(ratios: list[list[int]], max_tiles: int) -> tuple[int, int]:
    """The id (1-based; 0 is padding) and tile count of the supported aspect ratio using the most tiles."""
    best = max(range(len(ratios)), key=lambda i: (ratios[i][0] * ratios[i][1] <= max_tiles,
                                                   ratios[i][0] * ratios[i][1]))
    return best + 1, min(ratios[best][0] * ratios[best][1], max_tiles)
