"""clover: CLOVER (Cross-Layer Orthogonal Vectors) for transformer attention.

Importing clover registers the pruned and latent model types (``clover_llama``, ``clover_gpt2``, ``clover_bert``,
``clover_whisper``, ``clover_mllama``, ``clover_latent_llama``, ``clover_latent_gpt2``) with transformers' Auto
classes, so converted checkpoints load with a plain ``from_pretrained``.
"""

from . import save  # documented as clover.save.save_model(...), so it must be there after `import clover`
from .decompose import Factors, decompose
from .errors import CloverError
from .latent import LatentConfig, LatentReport, to_latent
from .modeling import register_all as _register_all
from .orthogonalize import OrthogonalizeConfig, OrthogonalizeReport, orthogonalize_
from .prune import PruneConfig, PruneReport, StackPlan, prune
from .slicing import SliceConfig, SliceReport, slice_
from .spectra import collect_spectra

_register_all()

# Pruned diffusers UNets: diffusers is an optional extra (clover[diffusion]) and slow to import, so these load
# on first use.
_UNET_IO = ("load_pruned_unet", "save_pruned_unet")


def __getattr__(name: str):
    if name in _UNET_IO:
        from .modeling import clover_unet

        return getattr(clover_unet, name)
    raise AttributeError(f"module 'clover' has no attribute {name!r}")


__all__ = [
    "CloverError",
    "Factors",
    "LatentConfig",
    "LatentReport",
    "OrthogonalizeConfig",
    "OrthogonalizeReport",
    "PruneConfig",
    "PruneReport",
    "SliceConfig",
    "SliceReport",
    "collect_spectra",
    "decompose",
    "load_pruned_unet",
    "orthogonalize_",
    "prune",
    "save",
    "save_pruned_unet",
    "slice_",
    "StackPlan",
    "to_latent",
]
