"""Filling a freshly built model from the one it was made from.

Every rewrite that changes shapes (prune, the latent runtimes, slicing, DeepSeek-V2's stock class) builds a new
model from a new config and then copies over everything it did not change. These helpers sit below all of those
rooms and the adapters, so none of them imports another room to get them.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import CloverError

# Config fields that describe the checkpoint, not the network: a config built for a rewritten model drops them.
DROPPED_SETTINGS = ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config")


def copy_matching(target: nn.Module, source: dict[str, torch.Tensor], complete: bool = False) -> None:
    """Copy into a freshly built ``target`` every tensor of the state dict ``source`` whose name and shape agree:
    what a rewrite leaves as it was (embeddings, norms, MLPs). ``complete``: every tensor of ``target`` must be
    found there (nothing may keep its random initialisation)."""
    with torch.no_grad():
        for name, tensor in target.state_dict().items():
            value = source.get(name)
            if value is not None and value.shape == tensor.shape:
                tensor.copy_(value)
            elif complete:
                got = None if value is None else tuple(value.shape)
                raise CloverError(f"internal: {name} of the new model ({tuple(tensor.shape)}) has no source tensor "
                                  f"({got})")


def keep_buffer_dtypes(pruned: nn.Module, model: nn.Module) -> None:
    """``.to(dtype)`` above also cast buffers that loaders keep in float32 (rotary ``inv_freq``): in bfloat16 the
    pruned model would then compute other rotations than the same checkpoint reloaded, and report another
    perplexity than the saved model has. Take every such buffer from the source model as it is there."""
    source = dict(model.named_buffers())
    for name, buffer in list(pruned.named_buffers()):
        theirs = source.get(name)
        if theirs is not None and theirs.shape == buffer.shape and theirs.dtype != buffer.dtype:
            owner, _, leaf = name.rpartition(".")
            pruned.get_submodule(owner)._buffers[leaf] = theirs.detach().clone()
