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
    from another stream, e.g. an encoder), which matters for calibration.
    """

    name: str
    layer: int
    module: nn.Module
    num_heads: int
    num_kv_heads: int
    rotary: bool = False
    role: Literal["self", "cross"] = "self"


class Adapter(ABC):
    """Per-family knowledge of attention layout; subclasses fill in ``sites``, ``read`` and ``write``."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    @abstractmethod
    def sites(self, model: nn.Module) -> list[AttentionSite]: ...

    @abstractmethod
    def read(self, site: AttentionSite) -> AttentionWeights: ...

    @abstractmethod
    def write(self, site: AttentionSite, weights: AttentionWeights) -> None: ...

    @abstractmethod
    def projections(self, site: AttentionSite) -> dict[str, nn.Module]:
        """The modules computing q, k, v and o (fused families repeat one module): calibration hooks them."""

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
