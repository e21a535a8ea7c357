"""Adapter registry: pick the adapter that knows a model's attention layout, or say which families exist."""

from __future__ import annotations

from torch import nn

from ..errors import CloverError
from .base import Adapter, AttentionSite
from .bert import BertAdapter
from .deepseek_v2 import DeepseekV2Adapter
from .gpt2 import GPT2Adapter
from .latent_llama import LatentLlamaAdapter
from .llama import LlamaAdapter
from .mllama import MllamaAdapter
from .unet import UNetAdapter
from .whisper import WhisperAdapter

ADAPTERS: tuple[Adapter, ...] = (GPT2Adapter(), LlamaAdapter(), BertAdapter(), DeepseekV2Adapter(), WhisperAdapter(),
                                 MllamaAdapter(), UNetAdapter(), LatentLlamaAdapter())


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def model_type(model: nn.Module) -> str:
    """transformers' ``config.model_type``; the class name for models without one (diffusers)."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def adapter_for(model: nn.Module) -> Adapter:
    found = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if found in adapter.model_types or (found is None and type(model).__name__ in adapter.class_names):
            return adapter
    classes = sorted(c for a in ADAPTERS for c in a.class_names)
    raise CloverError(
        f"unsupported model type {model_type(model)!r}: clover has adapters for "
        f"{', '.join(supported_model_types() + classes)}; use one of those or add an adapter in src/clover/adapters/"
    )


__all__ = ["ADAPTERS", "Adapter", "AttentionSite", "adapter_for", "model_type", "supported_model_types"]
