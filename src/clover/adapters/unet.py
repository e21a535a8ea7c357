"""diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x/XL): every ``Attention`` with ``to_q/k/v/to_out``.

Transformer blocks have ``attn1`` (self-attention over the latent pixels) and ``attn2`` (cross-attention: K and V
read the text encoder states of ``cross_attention_dim``); attention down/up blocks add plain self-attention with
a group norm and a residual. No positional rotation sits between Q and K, so Q-K and V-O are both exact. Q/K/V
have no bias by default (``to_out[0]`` has one); biases fold in as for every family.

Only what the stock processors (``AttnProcessor``, ``AttnProcessor2_0``) compute is understood: per-head q.k
softmax attention whose norms act on the block's *inputs* (group/spatial/cross norms) or its *output* (residual,
rescale), which a change of basis inside the heads does not touch. Anything else (a custom or IP-adapter
processor, fused QKV, added K/V projections, per-head Q/K norms, LoRA-wrapped linears) is refused by ``sites``
with the name of what was found, before anything is rewritten.

diffusers is an optional extra, imported only when a UNet is actually handled.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CloverError
from ..pairs import AttentionWeights
from .base import Adapter, AttentionSite, linear_projection, write_linear

STOCK_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")
SUPPORTED_ADDITION_EMBEDS = (None, "text_time")
# SDXL's "text_time" embedding reads six micro-conditioning ids (original size, crop, target size).
TIME_IDS = 6


def _diffusers():
    try:
        from diffusers.models import attention_processor

        from ..modeling import clover_unet
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise CloverError("handling a diffusers UNet needs diffusers: pip install 'clover[diffusion]'") from error
    return attention_processor, clover_unet


def _int_setting(config, name: str) -> int:
    value = config.get(name)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CloverError(f"this UNet's {name} differs per block ({list(value)}): clover's example inputs need "
                              "one encoder width; pass inputs of your own or use a UNet with a single width")
        value = value[0]
    return int(value)


class UNetAdapter(Adapter):
    name = "unet"
    model_types = ()
    class_names = ("UNet2DConditionModel",)
    prunes_cross_attention = True

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        attention_processor, clover_unet = _diffusers()
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, attention_processor.Attention)]
        for name, module in found:  # all checks first: nothing is rewritten unless every block is understood
            self._check(name, module, clover_unet.CloverAttnProcessor)
        parents: dict[str, int] = {}
        sites = []
        for name, module in found:
            layer = parents.setdefault(name.rsplit(".", 1)[0], len(parents))  # attn1/attn2 of a block share it
            role = "cross" if module.is_cross_attention else "self"
            # stack: tables group blocks as "self 0-15" / "cross 0-15" instead of by their long module names
            sites.append(AttentionSite(name, layer, module, module.heads, module.heads, rotary=False, role=role,
                                       stack=role))
        return sites

    @staticmethod
    def _check(name: str, attn: nn.Module, clover_processor: type) -> None:
        processor = type(attn.processor).__name__
        if type(attn.processor) is not clover_processor and processor not in STOCK_PROCESSORS:
            raise CloverError(
                f"{name} uses attention processor {processor}; clover understands only "
                f"{', '.join(STOCK_PROCESSORS)} (and its own CloverAttnProcessor of pruned UNets): install a "
                "stock one first, e.g. unet.set_attn_processor(AttnProcessor2_0())")
        problems = []
        if attn.added_kv_proj_dim is not None or attn.to_k is None or attn.to_v is None:
            problems.append("added K/V projections (AttnAddedKVProcessor blocks)")
        if getattr(attn, "fused_projections", False):
            problems.append("fused QKV projections (call unet.unfuse_qkv_projections())")
        if attn.norm_q is not None or attn.norm_k is not None:
            problems.append("per-head Q/K norms (qk_norm), which a change of basis inside the heads would change")
        if attn.to_out is None:
            problems.append("no output projection (pre_only)")
        layers = [attn.to_q, attn.to_k, attn.to_v] + ([] if attn.to_out is None else [attn.to_out[0]])
        wrapped = sorted({type(m).__name__ for m in layers if m is not None and type(m) is not nn.Linear})
        if wrapped:
            problems.append(f"projections of type {', '.join(wrapped)} instead of nn.Linear "
                            "(fuse or unload LoRA adapters first)")
        widths = (attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features) if not problems else ()
        if widths and (any(w % attn.heads for w in widths) or widths[0] != widths[1]):
            problems.append("grouped K/V heads (kv_heads), which the stock processors do not run either")
        if (not problems and type(attn.processor) is not clover_processor and attn.scale_qk
                and abs(attn.scale - (attn.to_q.out_features // attn.heads) ** -0.5) > 1e-12 * attn.scale):
            problems.append(f"resized heads under the stock processor {processor}, which would use the wrong "
                            "softmax scale (load pruned UNets with clover.load_pruned_unet)")
        if problems:
            raise CloverError(f"{name}: clover cannot rewrite this Attention exactly: it has {'; '.join(problems)}")

    def read(self, site: AttentionSite) -> AttentionWeights:
        m = site.module
        return AttentionWeights(
            linear_projection(m.to_q), linear_projection(m.to_k), linear_projection(m.to_v),
            linear_projection(m.to_out[0]), site.num_heads, site.num_kv_heads,
        )

    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        m = site.module
        return {"q": m.to_q, "k": m.to_k, "v": m.to_v, "o": m.to_out[0]}

    def write(self, site: AttentionSite, weights: AttentionWeights) -> None:
        m = site.module
        for layer, p in ((m.to_q, weights.q), (m.to_k, weights.k), (m.to_v, weights.v), (m.to_out[0], weights.o)):
            write_linear(layer, p)

    def caches_per_token(self, site: AttentionSite) -> bool:
        """A diffusion UNet never caches K/V: its reports show 0 KV-cache bytes per token."""
        return False

    def build_pruned(self, model: nn.Module, layers: list) -> nn.Module:
        """A copy of the UNet with resized Attention linears and clover's processor (see modeling/clover_unet)."""
        _, clover_unet = _diffusers()
        dims = {lr.site: {"qk_dim": lr.qk_dim, "vo_dim": lr.vo_dim} for lr in layers}
        return clover_unet.build_pruned_unet(model, dims)

    # --- inputs: random latents and conditioning (there is no image/text data offline) ---

    def unet_inputs(self, model: nn.Module, batch: int, text_tokens: int, seed: int) -> dict:
        """Seeded Gaussian latents, timesteps in [0, 1000), text-encoder states and, for SDXL, the pooled text
        embedding and micro-conditioning ids. The spatial size is capped (the function, not the resolution, is
        what a lossless check compares), at a multiple of the UNet's total downsampling."""
        config = model.config
        addition = config.get("addition_embed_type")
        if addition not in SUPPORTED_ADDITION_EMBEDS:
            raise CloverError(f"this UNet's addition_embed_type is {addition!r}; clover builds inputs for "
                              f"{', '.join(repr(a) for a in SUPPORTED_ADDITION_EMBEDS)} (SD 1.x/2.x, SDXL) only")
        for name in ("class_embed_type", "num_class_embeds"):
            if config.get(name) is not None:
                raise CloverError(f"this UNet is class-conditioned ({name}={config.get(name)!r}); clover builds "
                                  "inputs for text-conditioned UNets (SD 1.x/2.x, SDXL) only")
        hid_type = config.get("encoder_hid_dim_type")
        if hid_type not in (None, "text_proj"):
            raise CloverError(f"this UNet's encoder_hid_dim_type is {hid_type!r}; clover builds inputs for None "
                              "or 'text_proj' only")
        width = _int_setting(config, "encoder_hid_dim" if hid_type == "text_proj" else "cross_attention_dim")
        factor = 2 ** (len(config["down_block_types"]) - 1)
        size = config["sample_size"]
        height, width_px = (size, size) if isinstance(size, int) else size
        side = lambda s: max(factor, min(s, 4 * factor) // factor * factor)  # noqa: E731
        param = next(model.parameters())
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device=param.device, dtype=param.dtype)

        inputs = {
            "sample": randn(batch, config["in_channels"], side(height), side(width_px)),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen).to(param.device),
            "encoder_hidden_states": randn(batch, text_tokens, width),
        }
        if addition == "text_time":
            time_dim = config["addition_time_embed_dim"]
            total = config["projection_class_embeddings_input_dim"]
            ids = TIME_IDS if total > TIME_IDS * time_dim else (total - 1) // time_dim
            inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, total - ids * time_dim),
                                           "time_ids": randn(batch, ids).abs() * 512}
        return inputs

    def example_inputs(self, model: nn.Module, batch: int = 2, seqlen: int = 32, seed: int = 0) -> dict:
        return self.unet_inputs(model, batch, seqlen, seed)

    def calibration_inputs(self, model: nn.Module, input_ids: torch.Tensor) -> dict:
        """Random UNet inputs seeded by the token-id row, shaped like it (one sample per row, one encoder state
        per token). There is no image/caption data offline, so data-aware criteria on a UNet see random
        latents and embeddings: a check of the mechanics, not a claim about image quality."""
        ids = input_ids.detach().cpu().long().flatten()
        seed = int((ids * torch.arange(1, ids.numel() + 1)).sum() % (2**31 - 1))
        return self.unet_inputs(model, input_ids.shape[0], input_ids.shape[-1], seed)
