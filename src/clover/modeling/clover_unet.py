"""Runtime for pruned diffusers UNets (``UNet2DConditionModel``, e.g. Stable Diffusion XL).

diffusers has no ``trust_remote_code`` model classes, so a pruned UNet stays a stock ``UNet2DConditionModel``
whose ``Attention`` modules get smaller ``to_q``/``to_k`` (``heads * qk_dim``) and ``to_v``/``to_out[0]``
(``heads * vo_dim``) linears and clover's attention processor. The stock processors cannot run it:
``AttnProcessor2_0`` splits K and V with one head width and lets SDPA pick the scale ``1/sqrt(width)``, which
after pruning is no longer the model's ``1/sqrt(original head dim)``. ``CloverAttnProcessor`` splits Q/K and V by
their own widths and passes ``attn.scale``, which ``Attention`` fixed from the original ``dim_head`` at
construction and nothing recomputes.

On disk: diffusers' ``save_pretrained`` (stock config + weights) plus ``clover_dims.json`` with each block's
widths; ``load_pruned_unet`` rebuilds the stock UNet from the config, resizes the blocks, installs the processor
and then loads the weights strictly. A plain ``UNet2DConditionModel.from_pretrained`` refuses the directory
(weight shapes differ from the config), so it cannot silently load a half-matching model.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file
from torch import nn

from ..errors import CloverError
from ..output import atomic_dir, write_json

DIMS_FILE = "clover_dims.json"
DIMS_FORMAT = "clover-unet-dims/1"


class CloverAttnProcessor:
    """``AttnProcessor2_0`` with separate Q-K and V-O head widths and the construction-time softmax scale.

    Everything else (spatial/group norms, cross-attention norm, attention masks, 4-d inputs, residual and output
    rescaling) is done exactly as the stock processor does, so at unchanged widths it computes the same function.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, source_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, source_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split_heads(query), split_heads(key), split_heads(value),
                                             attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                             scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, value.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _resized(layer: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A new linear of the given size on the layer's device and dtype (its values are written afterwards)."""
    w = layer.weight
    return nn.Linear(in_features, out_features, bias=layer.bias is not None, device=w.device, dtype=w.dtype)


def resize_attention_(attn: Attention, qk_dim: int, vo_dim: int) -> None:
    """Give ``attn`` per-head widths ``qk_dim`` (Q, K) and ``vo_dim`` (V, O) and clover's processor."""
    heads = attn.heads
    attn.to_q = _resized(attn.to_q, attn.to_q.in_features, heads * qk_dim)
    attn.to_k = _resized(attn.to_k, attn.to_k.in_features, heads * qk_dim)
    attn.to_v = _resized(attn.to_v, attn.to_v.in_features, heads * vo_dim)
    attn.to_out[0] = _resized(attn.to_out[0], heads * vo_dim, attn.to_out[0].out_features)
    attn.set_processor(CloverAttnProcessor())


def _apply_dims_(unet: nn.Module, dims: dict[str, dict[str, int]]) -> None:
    modules = dict(unet.named_modules())
    missing = [name for name in dims if not isinstance(modules.get(name), Attention)]
    if missing:
        raise CloverError(f"clover dims name attention blocks this UNet does not have ({missing[:3]}): the config "
                          "and clover_dims.json come from different models")
    for name, d in dims.items():
        resize_attention_(modules[name], int(d["qk_dim"]), int(d["vo_dim"]))
    unet.clover_dims = {name: {"qk_dim": int(d["qk_dim"]), "vo_dim": int(d["vo_dim"])} for name, d in dims.items()}


def build_pruned_unet(model: nn.Module, dims: dict[str, dict[str, int]]) -> nn.Module:
    """A copy of ``model`` with every listed Attention resized (weights written by the adapter afterwards)."""
    pruned = copy.deepcopy(model)
    _apply_dims_(pruned, dims)
    return pruned.eval()


def save_pruned_unet(unet: nn.Module, out: str | os.PathLike, overwrite: bool = False,
                     report: dict | None = None) -> Path:
    """diffusers ``save_pretrained`` plus ``clover_dims.json`` (and clover's report), written atomically."""
    dims = getattr(unet, "clover_dims", None)
    if dims is None:
        raise CloverError("this UNet was not pruned by clover (it has no per-block widths): save it with "
                          "unet.save_pretrained, or prune it with clover.prune first")
    with atomic_dir(out, overwrite) as tmp:
        unet.save_pretrained(tmp)
        write_json(tmp / DIMS_FILE, {"format": DIMS_FORMAT, "attention": dims})
        if report is not None:
            write_json(tmp / "clover_report.json", report)
    return Path(out)


def load_pruned_unet(path: str | os.PathLike) -> UNet2DConditionModel:
    """Rebuild a UNet saved by ``save_pruned_unet``: stock model from its config, resized blocks, then weights."""
    path = Path(path)
    dims_file = path / DIMS_FILE
    if not dims_file.is_file():
        raise CloverError(f"{path} has no {DIMS_FILE}, so it is not a pruned clover UNet: load it with "
                          "UNet2DConditionModel.from_pretrained, or pass the directory save_pruned_unet wrote")
    sidecar = json.loads(dims_file.read_text())
    if sidecar.get("format") != DIMS_FORMAT:
        raise CloverError(f"{dims_file} has format {sidecar.get('format')!r}, expected {DIMS_FORMAT!r}: it was "
                          "written by another clover version; prune the UNet again")
    config = UNet2DConditionModel.load_config(path)
    if config.get("_class_name") != "UNet2DConditionModel":
        raise CloverError(f"{path} holds a {config.get('_class_name')!r}, not a UNet2DConditionModel: "
                          "load_pruned_unet only rebuilds pruned UNet2DConditionModels")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CloverError(f"{path} has no .safetensors weights: save the UNet with save_pruned_unet")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(shard))
    unet = UNet2DConditionModel.from_config(config)
    _apply_dims_(unet, sidecar["attention"])
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    if dtype != next(unet.parameters()).dtype:  # saved in half precision: load in it
        unet.to(dtype)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CloverError(f"{path}: weights do not match the config and {DIMS_FILE} ({str(error).splitlines()[0]}); "
                          "the directory was modified after saving, save the pruned UNet again") from error
    return unet.eval()


def load_unet(path: str | os.PathLike, dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """A UNet directory as the CLI is given it: pruned by clover (``clover_dims.json``) or stock diffusers."""
    path = Path(path)
    if (path / DIMS_FILE).is_file():
        unet = load_pruned_unet(path)
        return unet.to(dtype) if dtype is not None else unet
    try:
        unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as error:  # missing/mismatched weights, unreadable config
        line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CloverError(f"UNet {path} could not be loaded ({line}): save it again with "
                          "UNet2DConditionModel.save_pretrained (or save_pruned_unet for a pruned one)") from error
    return unet.eval()


def save_unet(unet: nn.Module, out: str | os.PathLike, overwrite: bool = False, report: dict | None = None) -> Path:
    """Save any UNet clover handed back: pruned ones with their widths, stock ones as plain diffusers weights
    (which ``UNet2DConditionModel.from_pretrained`` reloads), each atomically and with clover's report."""
    if getattr(unet, "clover_dims", None) is not None:
        return save_pruned_unet(unet, out, overwrite, report)
    with atomic_dir(out, overwrite) as tmp:
        unet.save_pretrained(tmp)
        if report is not None:
            write_json(tmp / "clover_report.json", report)
    return Path(out)
