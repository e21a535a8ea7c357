"""MLP refit: each layer's MLP down projection re-solved in closed form, so that the converted model hands every
later layer a residual stream closer to the original's.

The converted attention adds a slightly different update to the residual stream, and the error carries on through
every later layer. The MLP right after each attention block reads that stream, and what it adds is linear in its
down projection: given the MLP's hidden activations ``a`` on the converted model's own stream (the layers before it
converted and refit already), the down projection that brings the layer's output closest to the original model's
output of the same layer is a least-squares fit over the calibration tokens,

    min_W  sum_t ||u'_t + W a_t - h_t||^2 + ridge * mean(a^2) * ||W - W_0||^2,

with ``u'`` the converted stream after the attention block, ``h`` the original stream after the layer and ``W_0``
the original projection. So the MLP makes up, where its own activations can express it, for what the attention
conversion lost in this layer and the layers before. Only the normal equations' Gram matrix (intermediate x
intermediate) and cross moment are kept, one window at a time, in float64. A few thousand calibration tokens fit an
intermediate x hidden matrix, so the pull toward the original matters: each layer takes the ridge of ``RIDGES``
whose fit comes closest on the held-out windows, and keeps its new projection only if that is closer than the
original projection. Layers go first to last.

The error is priced in the residual stream as it is, not normalised per token, so tokens with a large stream weigh
more. The MLP keeps its shape and every other weight, so the stock layout, ``convert.verify`` and the engines are as
before: one more closed-form solve on the same calibration text, no training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import heldout
from ..adapters import adapter_for

RIDGES = (1e-2, 1e-1, 1.0, 10.0)  # times the mean activation energy: the pulls toward the original tried per layer


@dataclass
class MlpFit:
    """One layer's relative output error on the held-out windows, ``||h' - h||^2 / ||h||^2``."""

    before: float
    after: float  # with the ridge of RIDGES that gave the lowest held-out error
    kept: bool  # whether the new down projection went in (it lowered the held-out error)
    ridge: float


def _layer_pass(block: nn.Module, states: list[tuple[torch.Tensor, dict]], visit) -> list[tuple[torch.Tensor, dict]]:
    """``block`` run over ``states`` window by window (``heldout.run_layer``'s result); ``visit(i, out, a)`` sees
    window ``i``'s layer output and its MLP's hidden activations, what the down projection reads."""
    seen: list[torch.Tensor] = []
    hook = block.mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    nxt = []
    try:
        with torch.no_grad():
            for i, (hidden, kwargs) in enumerate(states):
                out = block(hidden, **kwargs)
                visit(i, out, seen.pop())
                nxt.append((out, kwargs))
    finally:
        hook.remove()
    return nxt


def refit_layer(block: nn.Module, converted: list, targets: list, n_train: int,
                ridges: tuple[float, ...] = RIDGES) -> tuple[torch.Tensor | None, MlpFit, list]:
    """``block``'s down projection fitted so its output on the converted stream ``converted`` comes closest to
    ``targets`` (the original stream after the same layer, per window) over the first ``n_train`` windows; the rest
    choose the ridge of ``ridges`` and whether the fit is kept. Returns the new weight (None if not kept), the fit,
    and the stream after the block."""
    down = block.mlp.down_proj
    width, dim = down.weight.shape[1], down.weight.shape[0]
    gram = torch.zeros(width, width, dtype=torch.float64, device=down.weight.device)
    cross = torch.zeros(width, dim, dtype=torch.float64, device=down.weight.device)
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    energy = 0.0

    def visit(i: int, out: torch.Tensor, hidden: torch.Tensor) -> None:
        nonlocal energy
        a = hidden.reshape(-1, width).double()
        target = targets[i][0].reshape(-1, dim).double()
        r = target - out.reshape(-1, dim).double()  # what the layer misses with the original projection
        if i < n_train:
            gram.addmm_(a.T, a)
            cross.addmm_(a.T, r)
        else:
            held.append((a, r))
            energy += float(target.square().sum())

    outputs = _layer_pass(block, converted, visit)
    total = max(energy, 1e-300)
    before = sum(float(r.square().sum()) for _, r in held) / total
    eye = torch.eye(width, dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal().mean().clamp_min(1e-300)
    fits = []
    for ridge in ridges:
        delta = torch.linalg.solve(gram + ridge * scale * eye, cross)
        fits.append((sum(float((r - a @ delta).square().sum()) for a, r in held) / total, ridge, delta))
    after, ridge, delta = min(fits, key=lambda fit: fit[0])
    if not after < before:
        return None, MlpFit(before, after, False, ridge), outputs
    with torch.no_grad():
        down.weight.add_(delta.T.to(down.weight.dtype))
    return down.weight.detach().clone(), MlpFit(before, after, True, ridge), heldout.run_layer(block, converted)


def refit(model: nn.Module, mla: nn.Module, train: torch.Tensor, held: torch.Tensor,
          ridges: tuple[float, ...] = RIDGES, progress: bool = True) -> tuple[list[torch.Tensor | None], list[MlpFit]]:
    """Every MLP down projection of the converted ``mla`` refit, first to last, toward the original ``model``'s
    residual stream after the same layer on the ``train`` windows (token ids), kept where the ``held`` windows say
    it helps; ``mla`` is changed in place. Returns per layer the new down weight (None where the original stays, for
    clover's reference of the function) and each layer's ``MlpFit``."""
    windows = torch.cat([train, held])
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    original = heldout.entering(model, 0, (adapter.calibration_inputs(model, row[None].to(device))
                                           for row in windows))
    converted = heldout.entering(mla, 0, ({"input_ids": row[None].to(device)} for row in windows))
    downs, fits = [], []
    pairs = list(zip(model.model.layers, mla.model.layers, strict=True))
    for layer, block in tqdm(pairs, desc="MLP refit", unit="layer", disable=not progress):
        original = heldout.run_layer(layer, original)
        new, fit, converted = refit_layer(block, converted, original, len(train), ridges)
        downs.append(new)
        fits.append(fit)
    return downs, fits
