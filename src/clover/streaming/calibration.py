"""Calibration statistics one decoder layer at a time (the SliceGPT / SVD-LLM way), equal to ``calibrate.collect``.

The calibration tokens go through the model's own forward on the meta-device skeleton, with only the tensors
before the first layer made real (embeddings), until a hook on the first layer captures its input hidden states
and the keyword arguments the model hands every layer (causal mask, rotary cos/sin, position ids). Then each layer
in turn is loaded, run on the cached states with the very hooks ``calibrate.collect`` uses, and its outputs
replace the cache. Statistics are those of the *original* model at every layer, as in memory, and sample by sample
(batch of one) as in memory, so the sums agree to the last bit.

The cache after each finished layer is written to the work folder, so a resumed run picks it up.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calibrate
from ..adapters import Adapter
from ..calibrate import SiteStats
from ..errors import CloverError
from .checkpoint import Checkpoint
from .skeleton import Block, head_tensor_names, materialize, release
from .workdir import WorkDir


class _Captured(Exception):
    """Raised by the hook on the first layer: everything the layers need has been computed."""


def _hidden_file(block: int) -> str:
    return f"hidden-after-{block:05d}.safetensors"


class LayerwiseCalibration:
    """Hidden states of the original model, advanced one block at a time; ``stats(block)`` gathers a block's."""

    def __init__(self, model: nn.Module, adapter: Adapter, blocks: list[Block], checkpoint: Checkpoint,
                 tokens: torch.Tensor, needs: dict[str, bool], work: WorkDir, progress: bool):
        if tokens.numel() == 0:
            raise CloverError("calibration got no tokens: pass --calib-samples and --calib-seqlen above zero")
        self.model, self.adapter, self.blocks, self.checkpoint = model, adapter, blocks, checkpoint
        self.tokens, self.needs, self.work, self.progress = tokens, needs, work, progress
        self.hidden: list[torch.Tensor] | None = None
        self.kwargs: dict | None = None
        self.position = -1  # the cache holds the outputs of this block (-1: the embeddings)

    def _prefix_tensors(self) -> list[str]:
        """Tensors outside every block and outside the output head: what runs before the first layer."""
        head = head_tensor_names(self.model)
        return [n for n in self.checkpoint.names
                if n not in head and not any(b.owns(n) for b in self.blocks)]

    def _capture(self, want_hidden: bool) -> None:
        names = [n for n in self._prefix_tensors() if n in self.model.state_dict()]
        tensors = self.checkpoint.read(names)
        self.model.load_state_dict(tensors, strict=False, assign=True)
        first = self.blocks[0].module
        box: dict = {}

        def hook(_module, args, kwargs):
            box["args"], box["kwargs"] = args, kwargs
            raise _Captured

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        hidden = []
        rows = self.tokens if want_hidden else self.tokens[:1]
        try:
            with torch.no_grad():
                for row in tqdm(rows, desc="embed calibration", unit="sample", disable=not self.progress or
                                not want_hidden, leave=False):
                    try:
                        self.model(**self.adapter.calibration_inputs(self.model, row[None]), use_cache=False)
                    except _Captured:
                        pass
                    else:
                        raise CloverError("internal: the first layer never ran during calibration")
                    args, kwargs = box["args"], dict(box["kwargs"])
                    hidden.append(args[0] if args else kwargs.pop("hidden_states"))
                    if len(args) > 1:
                        raise CloverError("internal: the model passes its layers positional arguments beyond the "
                                          "hidden states; layer-by-layer calibration does not support it")
                    kwargs.pop("hidden_states", None)
        finally:
            handle.remove()
            self.model.load_state_dict({n: torch.empty_like(t, device="meta") for n, t in tensors.items()},
                                       strict=False, assign=True)
        self.kwargs = kwargs
        if want_hidden:
            self.hidden = hidden

    def _ensure(self, block: Block) -> None:
        """Have the hidden states entering ``block`` (from the cache file of a resumed run when there is one)."""
        if self.kwargs is not None and self.position == block.index - 1:
            return
        cached = block.index - 1
        if cached >= 0:
            stored = self.work.path / _hidden_file(cached)
            if not stored.is_file():
                raise CloverError(f"the calibration cache {stored} is missing: delete {self.work.path} "
                                  "to start over")
            self._capture(want_hidden=False)
            saved = self.work.read_tensors(_hidden_file(cached))
            self.hidden = [saved[f"{i}"] for i in range(len(saved))]
        else:
            self._capture(want_hidden=True)
        self.position = cached

    def stats(self, block: Block) -> dict[str, SiteStats]:
        """Load ``block``, gather its sites' statistics on the cached states and advance the cache through it.

        The block stays loaded (the caller reads its attention weights next, then releases it).
        """
        self._ensure(block)
        materialize(block.module, block.name, self.checkpoint, "calibration")
        stats = {site.name: SiteStats() for site in block.sites}
        hooks = calibrate.attach(self.adapter, block.sites, stats, **self.needs)
        outputs = []
        try:
            with torch.no_grad():
                for hidden in tqdm(self.hidden, desc=f"calibrate layer {block.index}", unit="sample",
                                   disable=not self.progress, leave=False):
                    out = block.module(hidden, **self.kwargs)
                    outputs.append(out[0] if isinstance(out, tuple) else out)
        except BaseException:
            release(block.module)
            raise
        finally:
            for h in hooks:
                h.remove()
        self.hidden, self.position = outputs, block.index
        if block.index + 1 < len(self.blocks):
            self.work.write_tensors(_hidden_file(block.index), {f"{i}": h for i, h in enumerate(outputs)})
        return calibrate.finish(stats, self.tokens.numel()).sites

    def forget(self, block: Block) -> None:
        """The cache before ``block`` is no longer needed once ``block`` is recorded as finished."""
        if block.index >= 1:
            self.work.remove(_hidden_file(block.index - 1))
