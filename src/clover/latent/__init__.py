"""Latent KV: one shared key latent and one value latent per layer (TransMLA / Palu style), CLOVER's room for
cutting the KV cache across heads rather than inside each head.

``to_latent(model, LatentConfig(kv_ratio=0.5))`` returns a ``clover_latent_llama`` model and a report; see
``convert`` for the flow, ``solve`` for the math, ``budget`` for how one KV budget is split, and
``modeling/clover_latent_llama.py`` for the runtime whose cache holds only the latents.
"""

from .config import LatentConfig
from .convert import LatentReport, to_latent

__all__ = ["LatentConfig", "LatentReport", "to_latent"]
