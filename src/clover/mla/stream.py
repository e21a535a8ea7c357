"""Stream refit: the two projections of each layer that write into the residual stream, attention's ``o_proj``
and the MLP's ``down_proj``, re-solved in closed form so that the converted model hands every later layer a
residual stream closer to the original's.

The converted attention adds a slightly different update to the residual stream, and the error carries on through
every later layer. What a layer adds at each of its two write points is linear in the projection that writes it:
given what the projection reads on the converted model's own stream (the layers before it converted and refit
already) -- the heads' attention outputs for ``o``, the MLP's hidden activations for ``down`` -- the projection that
brings the stream at that point closest to the original model's stream at the same point (after the attention
block for ``o``, after the layer for ``down``) is a least-squares fit over the calibration tokens,

    min_W  sum_t ||u'_t + W a_t - h_t||^2 + ridge * mean(a^2) * ||W - W_0||^2,

with ``u'`` the converted stream without the projection's write, ``a`` what it reads, ``h`` the original stream and
``W_0`` the projection as converted. So each projection makes up, where what it reads can express it, for what the
attention conversion lost in this layer and the layers before; ``o`` first, then ``down`` on the stream the new
``o`` leaves. Only the normal equations' Gram matrix and cross moment are kept, one window at a time, in float64.
A few thousand calibration tokens fit a hidden x intermediate matrix, so the pull toward ``W_0`` matters: each
projection takes the ridge of ``RIDGES`` whose fit comes closest on the held-out windows, and keeps its new weight
only if that is closer than ``W_0``. Layers go first to last.

The error is priced in the residual stream as it is, not normalised per token, so tokens with a large stream weigh
more. Every weight keeps its shape, so the stock layout, ``convert.verify`` and the engines are as before: one more
closed-form solve on the same calibration text, no training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import heldout
from ..adapters import adapter_for
from .config import STREAM_PROJECTIONS

RIDGES = (1e-2, 1e-1, 1.0, 10.0)  # times the mean read energy: the pulls toward W_0 tried per projection


@dataclass
class StreamFit:
    """One projection's relative stream error at its write point on the held-out windows, ``||h' - h||^2 / ||h||^2``."""

    before: float
    after: float  # with the ridge of RIDGES that gave the lowest held-out error
    kept: bool  # whether the new projection went in (it lowered the held-out error)
    ridge: float


def write_point(layer: nn.Module, projection: str) -> tuple[nn.Linear, nn.Module | None]:
    """``projection``'s module in a decoder layer, and the module whose input is the stream right after it writes
    (the post-attention norm for ``o``; None for ``down``: the layer's output)."""
    if projection == "o":
        return layer.self_attn.o_proj, layer.post_attention_layernorm
    return layer.mlp.down_proj, None


def _layer_pass(layer: nn.Module, states: list[tuple[torch.Tensor, dict]], projection: str, visit
                ) -> list[tuple[torch.Tensor, dict]]:
    """``layer`` run over ``states`` window by window (``heldout.run_layer``'s result); ``visit(i, stream, a)`` sees
    window ``i``'s stream at ``projection``'s write point and what the projection read."""
    module, after = write_point(layer, projection)
    reads: list[torch.Tensor] = []
    streams: list[torch.Tensor] = []
    hooks = [module.register_forward_pre_hook(lambda m, args: reads.append(args[0]))]
    if after is not None:
        hooks.append(after.register_forward_pre_hook(lambda m, args: streams.append(args[0])))
    nxt = []
    try:
        with torch.no_grad():
            for i, (hidden, kwargs) in enumerate(states):
                out = layer(hidden, **kwargs)
                visit(i, streams.pop() if after is not None else out, reads.pop())
                nxt.append((out, kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    return nxt


def original_streams(layer: nn.Module, states: list[tuple[torch.Tensor, dict]]
                     ) -> tuple[dict[str, list[torch.Tensor]], list[tuple[torch.Tensor, dict]]]:
    """The original ``layer`` over ``states``: its stream at each write point, per window, and its outputs."""
    seen: list[torch.Tensor] = []
    outputs = _layer_pass(layer, states, "o", lambda i, stream, a: seen.append(stream))
    return {"o": seen, "down": [out for out, _ in outputs]}, outputs


def refit_layer(layer: nn.Module, converted: list, targets: list[torch.Tensor], n_train: int, projection: str = "down",
                ridges: tuple[float, ...] = RIDGES) -> tuple[torch.Tensor | None, StreamFit, list]:
    """``layer``'s ``projection`` fitted so the stream at its write point on the converted stream ``converted``
    comes closest to ``targets`` (the original stream at the same point, per window) over the first ``n_train``
    windows; the rest choose the ridge of ``ridges`` and whether the fit is kept. Returns the new weight (None if
    not kept), the fit, and the stream after the layer."""
    module, _ = write_point(layer, projection)
    width, dim = module.weight.shape[1], module.weight.shape[0]
    gram = torch.zeros(width, width, dtype=torch.float64, device=module.weight.device)
    cross = torch.zeros(width, dim, dtype=torch.float64, device=module.weight.device)
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    energy = 0.0

    def visit(i: int, stream: torch.Tensor, read: torch.Tensor) -> None:
        nonlocal energy
        a = read.reshape(-1, width).double()
        target = targets[i].reshape(-1, dim).double()
        r = target - stream.reshape(-1, dim).double()  # what the stream misses with the projection as converted
        if i < n_train:
            gram.addmm_(a.T, a)
            cross.addmm_(a.T, r)
        else:
            held.append((a, r))
            energy += float(target.square().sum())

    outputs = _layer_pass(layer, converted, projection, visit)
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
        return None, StreamFit(before, after, False, ridge), outputs
    with torch.no_grad():
        module.weight.add_(delta.T.to(module.weight.dtype))
    return module.weight.detach().clone(), StreamFit(before, after, True, ridge), heldout.run_layer(layer, converted)


def refit(model: nn.Module, mla: nn.Module, train: torch.Tensor, held: torch.Tensor,
          projections: tuple[str, ...] = STREAM_PROJECTIONS, ridges: tuple[float, ...] = RIDGES, progress: bool = True
          ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, StreamFit]]]:
    """The ``projections`` of every layer of the converted ``mla`` refit, first to last (in each layer in the order
    of ``STREAM_PROJECTIONS``), toward the original ``model``'s residual stream at the same write point on the ``train``
    windows (token ids), each kept where the ``held`` windows say it helps; ``mla`` is changed in place. Returns per
    layer the new weights of the kept projections (for clover's reference of the function) and every refit
    projection's ``StreamFit``."""
    windows = torch.cat([train, held])
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    original = heldout.entering(model, 0, (adapter.calibration_inputs(model, row[None].to(device))
                                           for row in windows))
    converted = heldout.entering(mla, 0, ({"input_ids": row[None].to(device)} for row in windows))
    weights, fits = [], []
    pairs = list(zip(model.model.layers, mla.model.layers, strict=True))
    for layer, block in tqdm(pairs, desc="stream refit", unit="layer", disable=not progress):
        targets, original = original_streams(layer, original)
        new, fit = {}, {}
        entering = converted
        for projection in (p for p in STREAM_PROJECTIONS if p in projections):
            weight, fit[projection], converted = refit_layer(block, entering, targets[projection], len(train),
                                                             projection, ridges)
            if weight is not None:
                new[projection] = weight
        weights.append(new)
        fits.append(fit)
    return weights, fits
