"""Layer-wise refit: each converted attention block trained, on its own, to give the original block's output.

The solve (``solve.py``) fits every piece in closed form on second moments: the rotary split to the original
scores, the joint latent to the keys and values it must rebuild, O to the latent's values. None of them sees the
softmax, which turns small score errors into large changes of attention where a head is sharp. Here every tensor
of one converted block (the unrotated and rotated query maps, the shared rotated key, the latent's down and up
maps, O) is tuned by Adam to make the block's output match the original block's on the calibration windows: the
original model's attention inputs go into both, so the blocks are independent and need one pass of the original
model. The layout does not change (one latent rank, one rotated key, no biases), so the result is the same stock
model, and ``convert.verify`` checks it against clover's reference as before. No labels and no pass through the
rest of the model: the same calibration text, priced at the block's output instead of in closed form.

With ``inputs="converted"`` the blocks are refit first to last and each one reads what the converted model feeds
it (the blocks before it converted and refit, the rest of the model original), still toward the original block's
output on the original inputs: a block then also makes up, where it can, for the error the blocks before it left in
its inputs. That costs one more pass of one decoder layer per block; the original model still runs once.

With ``inputs="residual"`` the blocks read the converted model's inputs as above, and each block's target is the
original block's output plus the original residual stream's difference from the converted one where the layer
begins (``h - h'``): a block that hit it would hand the MLP after it the original model's residual stream, so the
block makes up the error the layers before it left not only in its own inputs but in what it adds to. Where the
difference is beyond what attention can write, the held-out check (against the same target) keeps the solve.

Every tensor steps by ``lr`` times its own RMS (the solve leaves the scales of a pair's two sides wherever they
fell), the learning rate decays linearly to zero, and a block keeps its refit only if its relative output error on
the held-out windows (the split search's, never trained on) went down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import heldout
from ..calibrate import feed
from .reference import MAPS, ReferenceAttention, mla_attention, reference_model
from .solve import LayerMla


@dataclass
class LocalFit:
    """One block's relative output error on the held-out windows, ``||y' - y||^2 / ||y||^2``."""

    before: float
    after: float
    kept: bool  # whether the refit went in (it lowered the held-out error)


@dataclass
class BlockData:
    """What one refit block reads and the original block's outputs it must give (float32, (n, T, D)); for a
    residual target the outputs hold the original residual stream entering the layer added in until
    ``ConvertedStream`` gives the converted one to take away."""

    inputs: torch.Tensor | None  # None until ``ConvertedStream`` gives them (``block_data(inputs=False)``)
    outputs: torch.Tensor


def block_data(model: nn.Module, adapter, sites, windows: torch.Tensor, progress: bool = True,
               inputs: bool = True, residual: bool = False) -> list[BlockData]:
    """Per site, what the original attention block reads (the q projection's input; with ``inputs=False`` not
    kept, for blocks that will read the converted model's) and writes (the o projection's output; with
    ``residual``, plus the residual stream entering its decoder layer) on ``windows`` (n, seqlen) of token ids."""
    seen: list[dict[str, list]] = [{"inputs": [], "outputs": [], "stream": []} for _ in sites]
    hooks = []
    for i, site in enumerate(sites):
        parts = adapter.projections(site)
        if inputs:
            hooks.append(parts["q"].register_forward_pre_hook(
                lambda module, args, i=i: seen[i]["inputs"].append(args[0].detach().float().cpu())))
        hooks.append(parts["o"].register_forward_hook(
            lambda module, args, out, i=i: seen[i]["outputs"].append(out.detach().float().cpu())))
        if residual:
            hooks.append(model.model.layers[site.layer].register_forward_pre_hook(
                lambda module, args, kwargs, i=i: seen[i]["stream"].append(
                    (args[0] if args else kwargs["hidden_states"]).detach().float().cpu()), with_kwargs=True))
    feed(model, adapter, windows, hooks, "block inputs", progress)
    return [BlockData(torch.cat(s["inputs"]) if inputs else None,
                      torch.cat(s["outputs"]) + torch.cat(s["stream"]) if residual else torch.cat(s["outputs"]))
            for s in seen]


class ConvertedStream:
    """What the converted model feeds each block: the hidden states of clover's reference of it (``reference.py``,
    the original model with converted attention blocks) per window, one decoder layer at a time. ``inputs(i)`` is
    block ``i``'s attention input (after the layer's input norm); ``advance(i, layer)`` puts ``layer`` in as block
    ``i`` and runs that decoder layer, giving block ``i + 1``'s."""

    def __init__(self, model: nn.Module, adapter, layers: list[LayerMla], head_dim: int, windows: torch.Tensor):
        self.twin = reference_model(model, layers, head_dim)
        self.scaling = head_dim**-0.5
        device = next(self.twin.parameters()).device
        self.states = heldout.entering(self.twin, 0, (adapter.calibration_inputs(self.twin, row[None].to(device))
                                                      for row in windows))

    def inputs(self, i: int) -> torch.Tensor:
        norm = self.twin.model.layers[i].input_layernorm
        with torch.no_grad():
            return torch.cat([norm(hidden).float().cpu() for hidden, _ in self.states])

    def residual(self) -> torch.Tensor:
        """The converted model's residual stream where the current block's decoder layer begins (before its
        norm): what a residual target takes away."""
        return torch.cat([hidden.float().cpu() for hidden, _ in self.states])

    def advance(self, i: int, layer: LayerMla) -> None:
        block = self.twin.model.layers[i]
        block.self_attn = ReferenceAttention(layer, self.scaling, next(self.twin.parameters()).dtype)
        self.states = heldout.run_layer(block, self.states)


def relative_error(maps: dict, data: BlockData, rotary, freqs, group: int, scaling: float) -> float:
    with torch.no_grad():
        err = total = 0.0
        cos, sin = rotary
        for x, y in zip(data.inputs.split(1), data.outputs.split(1), strict=True):
            err += float((mla_attention(x, maps, cos, sin, freqs, group, scaling) - y).square().sum())
            total += float(y.square().sum())
    return err / max(total, 1e-300)


def refit_layer(layer: LayerMla, train: BlockData, held: BlockData, rotary, scaling: float, steps: int, lr: float,
                batch: int, seed: int) -> tuple[LayerMla, LocalFit]:
    """``layer`` refit to the original block's outputs on ``train`` (``steps`` Adam steps of ``batch`` windows);
    ``held`` decides whether the refit is kept. ``rotary``: the model's (cos, sin) for one window's positions (every
    window has the same length, so they broadcast over a batch)."""
    maps = {name: getattr(layer, name).detach().float().clone() for name in MAPS}
    before = relative_error(maps, held, rotary, layer.rope_freqs, layer.group, scaling)
    params = {name: nn.Parameter(t) for name, t in maps.items()}
    optimizer = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().square().mean().sqrt())}
                                  for p in params.values()])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    scale = float(train.outputs.square().mean())
    for _ in range(steps):
        pick = torch.randperm(len(train.inputs), generator=generator)[:batch]
        x, y = train.inputs[pick], train.outputs[pick]
        cos, sin = rotary
        loss = (mla_attention(x, params, cos, sin, layer.rope_freqs, layer.group, scaling) - y).square().mean()
        optimizer.zero_grad(set_to_none=True)
        (loss / scale).backward()
        optimizer.step()
        schedule.step()
    fitted = {name: p.detach() for name, p in params.items()}
    after = relative_error(fitted, held, rotary, layer.rope_freqs, layer.group, scaling)
    if not after < before:
        return layer, LocalFit(before, after, False)
    dtype = layer.down.dtype
    return dataclasses.replace(layer, **{name: t.to(dtype) for name, t in fitted.items()}), LocalFit(before, after,
                                                                                                    True)


def refit(model: nn.Module, adapter, sites, layers: list[LayerMla], train: torch.Tensor, held: torch.Tensor,
          head_dim: int, steps: int, lr: float, batch: int, inputs: str = "original",
          progress: bool = True) -> tuple[list[LayerMla], list[LocalFit]]:
    """Every converted block of ``layers`` refit to the original ``model``'s blocks on ``train`` windows, kept where
    the ``held`` windows say it helps; each block reads the original model's attention inputs, or with
    ``inputs="converted"`` the converted model's (``ConvertedStream``), or with ``inputs="residual"`` the converted
    model's toward the original output plus the residual stream's error at the layer's start. Returns the new
    layers and each block's ``LocalFit``."""
    positions = torch.arange(train.shape[1])[None]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1), positions)  # float32, as the block data
    rotary = (cos.float(), sin.float())

    stream = ConvertedStream(model, adapter, layers, head_dim, torch.cat([train, held])) \
        if inputs in ("converted", "residual") else None
    residual = inputs == "residual"
    train_data = block_data(model, adapter, sites, train, progress, inputs=stream is None, residual=residual)
    held_data = block_data(model, adapter, sites, held, progress, inputs=stream is None, residual=residual)
    out, fits = [], []
    for i, layer in enumerate(tqdm(layers, desc="layer-wise refit", unit="layer", disable=not progress)):
        if stream:  # the training windows first, then the held-out ones
            train_data[i].inputs, held_data[i].inputs = stream.inputs(i).split([len(train), len(held)])
        if residual:  # the original output plus h - h': the original stream went in with the outputs
            for data, converted in zip((train_data[i], held_data[i]), stream.residual().split([len(train), len(held)]),
                                       strict=True):
                data.outputs -= converted
        new, fit = refit_layer(layer, train_data[i], held_data[i], rotary, head_dim**-0.5, steps, lr, batch, seed=i)
        if stream and i + 1 < len(layers):  # the last block gives no later one its inputs
            stream.advance(i, new)
        out.append(new)
        fits.append(fit)
        train_data[i] = held_data[i] = None  # free each block's data once it is refit
    return out, fits
