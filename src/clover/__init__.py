"""clover: CLOVER (Cross-Layer Orthogonal Vectors) for transformer attention.

Importing clover registers the pruned model types (``clover_llama``, ``clover_gpt2``, ``clover_bert``,
``clover_whisper``) with transformers' Auto classes, so pruned checkpoints load with a plain ``from_pretrained``.
"""

from .decompose import Factors, decompose
from .errors import CloverError
from .modeling import register_all as _register_all
from .orthogonalize import OrthogonalizeConfig, OrthogonalizeReport, orthogonalize_
from .prune import PruneConfig, PruneReport, prune
from .spectra import collect_spectra

_register_all()

__all__ = [
    "CloverError",
    "Factors",
    "OrthogonalizeConfig",
    "OrthogonalizeReport",
    "PruneConfig",
    "PruneReport",
    "collect_spectra",
    "decompose",
    "orthogonalize_",
    "prune",
]
