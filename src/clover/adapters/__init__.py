"""Adapter registry: pick the adapter that knows a model's attention layout, or say which families exist."""

from __future__ import annotations

from torch import nn

from ..errors import CloverError
from .base import Adapter, AttentionSite
from .bert import BertAdapter
from .deepseek_v2 import DeepseekV2Adapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .mllama import MllamaAdapter
from .whisper import WhisperAdapter

ADAPTERS: tuple[Adapter, ...] = (GPT2Adapter(), LlamaAdapter(), BertAdapter(), DeepseekV2Adapter(), WhisperAdapter(),
                                 MllamaAdapter())


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise CloverError(
        f"unsupported model type {model_type!r}: clover has adapters for {', '.join(supported_model_types())}; "
        "use one of those or add an adapter in src/clover/adapters/"
    )


__all__ = ["ADAPTERS", "Adapter", "AttentionSite", "adapter_for", "supported_model_types"]
