"""What an adapter is: the one place that knows how a model family lays out its attention.

An adapter finds every attention block (a *site*), reads its Q/K/V/O into the family-free
``AttentionWeights`` layout and writes rewritten weights back. Everything else in clover is generic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..pairs import AttentionWeights, Projection


@dataclass
class AttentionSite:
    """One attention block inside a model.

    ``rotary`` means rotary position embeddings act on Q and K between the projections, so their product depends
    on position and a Q-K rewrite would not be exact. ``role`` is ``"self"`` or ``"cross"`` (keys and values come
    from another stream, e.g. an encoder), which matters for calibration. ``own_kv_input`` marks self-attention
    whose K/V projections still read other states than Q (DeepSeek-V2's normalised KV latent), so calibration
    hooks their input separately, as for cross-attention.
    ``stack`` names the per-layer dims
    list of the pruned config that holds this block's widths (``""``: ``qk_dims``/``vo_dims``, else
    ``<stack>_qk_dims``/``<stack>_vo_dims``), for models with several stacks of blocks (encoder, decoder, cross).
    ``caches_kv`` says whether generation caches this block's K and V once per generated token (not so for an
    encoder's self-attention or for cross-attention, whose cache is per encoder position).
    ``qk_inexact`` says why no change of basis of Q-K is exact at this site for a reason other than rotary
    embeddings (e.g. a norm acting on q and k heads); empty when Q-K is rewritable.
    """

    name: str
    layer: int
    module: nn.Module
    num_heads: int
    num_kv_heads: int
    rotary: bool = False
    role: Literal["self", "cross"] = "self"
    own_kv_input: bool = False
    qk_inexact: str = ""
    stack: str = ""
    caches_kv: bool = True

    @property
    def separate_kv_input(self) -> bool:
        """Whether the K/V side of the pairs reads other inputs than the Q side (whitening needs both)."""
        return self.role == "cross" or self.own_kv_input


class Adapter(ABC):
    """Per-family knowledge of attention layout; subclasses fill in ``sites``, ``read`` and ``write``."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # True where the config holds one head dim for every layer, so pruned ranks must be equal across layers.
    uniform_head_dims: ClassVar[bool] = False
    # Models without a ``config.model_type`` (diffusers) are matched by their class name instead.
    class_names: ClassVar[tuple[str, ...]] = ()
    # Whether ``prune`` may shrink cross-attention blocks (the family's pruned runtime resizes them).
    prunes_cross_attention: ClassVar[bool] = False
    # What every prune report of this family should say (e.g. what pruning cannot shrink there).
    prune_notes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def sites(self, model: nn.Module) -> list[AttentionSite]: ...

    @abstractmethod
    def read(self, site: AttentionSite) -> AttentionWeights: ...

    @abstractmethod
    def write(self, site: AttentionSite, weights: AttentionWeights) -> None: ...

    @abstractmethod
    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        """The modules computing q, k, v and o (fused families repeat one module): calibration hooks them."""

    def adjust_ranks(self, kind: str, keeps: list[int], units: int) -> tuple[list[int], str]:
        """Per-layer ranks the family's runtime can hold (``units`` = head dims before), and why they changed.

        Families whose config holds one head dim for all layers, or whose runtime needs even dims, raise ranks
        here (keeping more is always correct); the default keeps what the criterion chose.
        """
        return keeps, ""

    def cache_width(self, site: AttentionSite, weights: AttentionWeights) -> int:
        """Values one token adds to this block's KV cache: its K and V rows (families caching a latent override)."""
        return weights.k.weight.shape[0] + weights.v.weight.shape[0]

    def caches_per_token(self, site: AttentionSite) -> bool:
        """Whether each generated token adds this block's K and V to the KV cache (reported cache savings).
        Decoder self-attention does; an encoder's self-attention and cross-attention (cached per encoder position)
        do not. Families whose sites cannot say so themselves override this."""
        return site.role == "self" and site.caches_kv

    def build_pruned(self, model: nn.Module, layers: list) -> nn.Module | None:
        """The pruned model for per-block ranks ``layers`` (``prune.LayerRanks``), for families whose runtime is
        not a transformers ``clover_<family>`` model (diffusers) or is a stock class with a new config (DeepSeek-V2).
        None: use the generic ``clover_<family>`` runtime."""
        return None

    def block_name(self, site: AttentionSite) -> str:
        """Name of the module holding a site's whole layer (attention, MLP, norms). Streaming conversion reads,
        calibrates and writes one such block at a time; the default is the attention module's parent."""
        return site.name.rpartition(".")[0]

    def tensor_names(self, site: AttentionSite) -> list[str]:
        """Checkpoint names of the tensors a site's attention reads (its module's state dict, fully named), so a
        streaming conversion loads exactly those from the safetensors shards."""
        return [f"{site.name}.{key}" for key in site.module.state_dict()]

    def residual_layout(self, model: nn.Module):
        """Where the residual stream is read and written (``residual.ResidualLayout``), for hidden-dimension
        slicing; None where the family has no folding rule (slicing then refuses it by name)."""
        return None

    def shared_rope_query(self, site: AttentionSite) -> tuple[nn.Module, torch.Tensor] | None:
        """Where every head's query meets one rotated key shared by all heads (MLA): the query module and the
        indices ``(heads, rope dims)`` of its rows that are rotated. Such rows form no exact pair (RoPE sits between
        them and the key), but they are the only per-head freedom the shared key leaves, so fine-tuning's ``rope``
        target trains them (a core per head, applied before RoPE). None in families whose keys are per head."""
        return None

    def mlp_up(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The MLP up projection of every layer as ``(name, module)`` (an ``nn.Linear`` or a transformers
        ``Conv1D``); fine-tuning trains it in head-sized blocks. Families without one return ``[]``."""
        return []

    def calibration_inputs(self, model: nn.Module, input_ids: torch.Tensor) -> dict:
        """Model inputs for one calibration batch of token ids; families with another stream (audio, images,
        encoder states) override this to add it, so calibration itself stays family-free."""
        return {"input_ids": input_ids}

    def example_inputs(self, model: nn.Module, batch: int = 2, seqlen: int = 32, seed: int = 0) -> dict:
        """Inputs for the lossless check: random token ids (and encoder states where the model cross-attends)."""
        gen = torch.Generator().manual_seed(seed)
        config = model.config
        param = next(model.parameters())
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, seqlen), generator=gen).to(param.device)}
        if getattr(config, "add_cross_attention", False):
            states = torch.randn(batch, seqlen // 2, config.hidden_size, generator=gen)
            inputs["encoder_hidden_states"] = states.to(device=param.device, dtype=param.dtype)
        return inputs


class LinearsAdapter(Adapter):
    """Families whose attention holds four separate ``nn.Linear`` modules for q, k, v and o (LLaMA, Whisper,
    Mllama): ``linear_names`` says what they are called; reading, hooking and writing follow from it."""

    linear_names: ClassVar[tuple[str, str, str, str]] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        return {kind: getattr(site.module, name) for kind, name in zip("qkvo", self.linear_names, strict=True)}

    def read(self, site: AttentionSite) -> AttentionWeights:
        mods = self.projections(site)
        return AttentionWeights(*(linear_projection(mods[kind]) for kind in "qkvo"), site.num_heads,
                                site.num_kv_heads)

    def write(self, site: AttentionSite, weights: AttentionWeights) -> None:
        mods = self.projections(site)
        for kind in "qkvo":
            write_linear(mods[kind], getattr(weights, kind))


def linear_projection(layer: nn.Linear) -> Projection:
    return Projection(layer.weight.detach(), None if layer.bias is None else layer.bias.detach())


# While set (inside ``capture_writes``), ``set_parameter`` records instead of writing.
_CAPTURED: ContextVar[dict | None] = ContextVar("clover_captured_writes", default=None)


@contextmanager
def capture_writes() -> Iterator[dict[int, tuple[nn.Parameter, torch.Tensor]]]:
    """Run an adapter's ``write`` without touching the model: every value it would store is collected as
    ``{id(param): (param, value)}``, still attached to autograd. Fine-tuning uses this to compute the weights of
    a site from trainable factors through the adapter, so the adapter stays the only code knowing the layout."""
    captured: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    token = _CAPTURED.set(captured)
    try:
        yield captured
    finally:
        _CAPTURED.reset(token)


def set_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write ``value`` into ``param`` in place when shapes agree (keeps ties and optimiser refs), else resize."""
    captured = _CAPTURED.get()
    if captured is not None:
        captured[id(param)] = (param, value)
        return
    with torch.no_grad():
        if param.shape == value.shape:
            param.copy_(value)
        else:
            param.data = value.to(device=param.device, dtype=param.dtype).contiguous()


def write_linear(layer: nn.Linear, p: Projection) -> None:
    set_parameter(layer.weight, p.weight)
    if layer.bias is not None:
        set_parameter(layer.bias, p.bias)
    layer.out_features, layer.in_features = p.weight.shape
