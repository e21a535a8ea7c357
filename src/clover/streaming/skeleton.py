"""The model's structure without its weights: modules on the meta device, filled one block at a time.

Building the real transformers class on the meta device (``accelerate.init_empty_weights``) gives the adapter
real modules to find sites in, with the names the checkpoint uses, so the in-memory code (``adapter.read``,
``adapter.write``, calibration hooks, the decoder layer's own forward) runs unchanged on whichever block holds
real tensors at the moment. Buffers (rotary frequencies) are small and stay real.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from torch import nn

from ..adapters import Adapter, AttentionSite, adapter_for
from ..errors import CloverError
from ..models import model_from_config
from .checkpoint import Checkpoint


@dataclass
class Block:
    """One decoder layer: its module, its name in the checkpoint and the attention sites inside it."""

    index: int
    name: str
    module: nn.Module
    sites: list[AttentionSite] = field(default_factory=list)

    def owns(self, tensor_name: str) -> bool:
        return tensor_name.startswith(self.name + ".")


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model class with every parameter on the meta device (no memory)."""
    try:
        with init_empty_weights():
            return model_from_config(config, dtype=dtype).eval()
    except ValueError as error:  # no class for the config
        raise CloverError(f"{type(config).__name__} has no model class in transformers for its architecture "
                          f"({error}): use a supported architecture") from None


def blocks_of(model: nn.Module) -> tuple[Adapter, list[Block]]:
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if not sites:
        raise CloverError(f"no attention blocks found in this {model.config.model_type} model: is it a full model?")
    modules = dict(model.named_modules())
    blocks: dict[str, Block] = {}
    for site in sites:
        name = adapter.block_name(site)
        if name not in blocks:
            blocks[name] = Block(len(blocks), name, modules[name])
        blocks[name].sites.append(site)
    return adapter, list(blocks.values())


def materialize(module: nn.Module, prefix: str, checkpoint: Checkpoint, what: str) -> None:
    """Give ``module``'s parameters (and saved buffers) their tensors from the checkpoint."""
    names = {key: f"{prefix}.{key}" for key in module.state_dict()}
    checkpoint.require(names.values(), what)
    tensors = checkpoint.read(names.values())
    module.load_state_dict({key: tensors[full] for key, full in names.items()}, strict=True, assign=True)


def release(module: nn.Module) -> None:
    """Back to the meta device: the block's memory is freed, its structure stays."""
    module.load_state_dict({k: torch.empty_like(v, device="meta") for k, v in module.state_dict().items()},
                           strict=True, assign=True)
    return_freed_memory()


def return_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS (glibc keeps freed blocks of up to 32 MB in its heap,
    which would make resident memory creep up layer after layer); a no-op where there is no glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def head_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names of the output head, which nothing before the last layer reads."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    prefix = next(name for name, m in model.named_modules() if m is head)
    return {f"{prefix}.{key}" for key in head.state_dict()}
