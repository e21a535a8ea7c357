"""Choosing a lever from data: how far a rewritten model's outputs move from the original's on held-out windows.

Where the sign of a choice depends on the model (V-O whitened by attention-mixed values or by layer inputs won on
SmolLM2 and lost on a real speech encoder), clover holds the last calibration windows out, rewrites with each
choice from the rest, and keeps the choice whose outputs stay closest to the original's. The measure is the one a
user feels: for models with logits, the mean KL divergence of the rewritten next-token (or per-position)
distribution from the original's; otherwise (encoders' hidden states, a UNet's noise) the squared error relative
to the original output's energy. Calibration text only: the test split is never read here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter
from .errors import CloverError
from .verify import model_outputs


def split_windows(batches: torch.Tensor, holdout: int, searching: bool, inputs: int,
                  what: str = "the key/value split", fixed: str = "a fixed --split") -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out windows, statistics windows): the last ``holdout`` choose (when ``searching``), the rest give the
    statistics, which must hold at least ``inputs`` tokens for an ``inputs``-dim input moment."""
    if searching and len(batches) <= holdout:
        raise CloverError(f"choosing {what} needs {holdout} held-out calibration windows and at least one more: "
                          f"pass --calib-samples above {holdout}, or {fixed}")
    held = batches[len(batches) - holdout:] if searching else batches[:0]
    statistics = batches[: len(batches) - len(held)]
    if statistics.numel() < inputs:
        raise CloverError(f"{statistics.numel()} calibration tokens cannot estimate the {inputs}-dim input moment: "
                          f"pass more --calib-samples or a longer --calib-seqlen (at least {inputs} tokens)")
    return held, statistics


class Reference:
    """The original model's outputs on ``windows`` (token ids, (n, seqlen)), computed once."""

    def __init__(self, model: nn.Module, adapter: Adapter, windows: torch.Tensor):
        self.adapter = adapter
        self.windows = windows
        self.outputs = [model_outputs(model, self._inputs(model, row)) for row in windows]
        self.logits = _has_logits(model, self._inputs(model, windows[:1]))
        self.metric = "KL divergence" if self.logits else "relative squared error"

    def _inputs(self, model: nn.Module, rows: torch.Tensor) -> dict:
        device = next(model.parameters()).device
        return self.adapter.calibration_inputs(model, rows.reshape(-1, rows.shape[-1]).to(device))

    def loss(self, model: nn.Module) -> float:
        """Mean over the windows of ``fidelity_loss`` (lower is closer to the original)."""
        outputs = (model_outputs(model, self._inputs(model, row)) for row in self.windows)
        return mean_fidelity(zip(self.outputs, outputs, strict=True), self.logits)


class _Reached(Exception):
    """Raised by the capture hook: the forward has reached the layer, nothing after it is needed."""


def entering(model: nn.Module, start: int, inputs) -> list[tuple[torch.Tensor, dict]]:
    """Per model input of ``inputs`` (dicts for the model's forward), the hidden states entering decoder layer
    ``start`` of ``model.model.layers`` and the other arguments every layer gets (rotary embeddings, mask), with the
    cache off: a forward that stops at that layer."""
    seen: list[tuple[torch.Tensor, dict]] = []

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden, {**kwargs, "past_key_values": None, "use_cache": False}))
        raise _Reached

    hook = model.model.layers[start].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for one in inputs:
                try:
                    model(**one)
                except _Reached:
                    pass
    finally:
        hook.remove()
    return seen


def run_layer(layer: nn.Module, states: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """``entering``'s states one decoder layer further: what enters the layer after ``layer``."""
    with torch.no_grad():
        return [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in states]


class FromLayer:
    """The held-out loss of a decoder-only language model (``model.model.layers``, ``.norm``, ``lm_head``) whose
    layers before ``start`` no longer change: a search that rewrites one layer at a time, first to last
    (``mla.convert.split_per_layer``), then pays for the layers from ``start`` on and not for the settled ones. The
    hidden states entering layer ``start``, and the arguments every layer gets (rotary embeddings, mask), are
    captured once per window by a forward that stops there; ``loss`` runs the rest as the model's own forward does,
    without a KV cache (a fresh cache per call holds the same keys), so it equals ``reference.loss(model)``.
    ``advance`` settles layer ``start``: one pass of it over the captured states gives the next layer's, so a search
    over every layer runs each settled layer once, not once per later layer."""

    def __init__(self, reference: Reference, model: nn.Module, start: int):
        if not reference.logits:
            raise ValueError("FromLayer measures a language model's logits; this model has none")
        self.reference, self.model, self.start = reference, model, start
        self.entering = entering(model, start, (reference._inputs(model, row) for row in reference.windows))

    def advance(self) -> None:
        """Layer ``start`` is settled: run it once on the captured states, and start later losses after it."""
        layers = self.model.model.layers
        if self.start >= len(layers):
            raise ValueError(f"all {len(layers)} layers are settled already")
        self.entering = run_layer(layers[self.start], self.entering)
        self.start += 1

    def loss(self) -> float:
        """Mean over the held-out windows of the KL from the original, running layers ``start`` on."""
        with torch.no_grad():
            outputs = (self._logits(hidden, kwargs) for hidden, kwargs in self.entering)
            return mean_fidelity(zip(self.reference.outputs, outputs, strict=True), True)

    def _logits(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The rest of the forward from layer ``start``: the remaining layers, the final norm and the head."""
        for layer in self.model.model.layers[self.start:]:
            hidden = layer(hidden, **kwargs)
        return self.model.lm_head(self.model.model.norm(hidden)).float()


def _has_logits(model: nn.Module, inputs: dict) -> bool:
    with torch.no_grad():
        return getattr(model(**inputs), "logits", None) is not None


def mean_fidelity(pairs, logits: bool) -> float:
    """The mean of ``fidelity_loss`` over (original output, rewritten output) pairs, one per held-out window: what
    ``Reference.loss`` and ``FromLayer.loss`` both report, summed in window order."""
    losses = [fidelity_loss(reference, output, logits) for reference, output in pairs]
    return sum(losses) / len(losses)


def fidelity_loss(reference: torch.Tensor, output: torch.Tensor, logits: bool) -> float:
    """KL(original || rewritten) per position for logits, else ||output - reference||^2 / ||reference||^2."""
    if logits:
        ref = F.log_softmax(reference.double().flatten(0, -2), dim=-1)
        new = F.log_softmax(output.double().flatten(0, -2), dim=-1)
        return float(F.kl_div(new, ref, log_target=True, reduction="batchmean"))
    ref = reference.double()
    return float((output.double() - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300))
