"""The rotation: principal directions of the residual stream as every norm of the model sees it.

One basis serves the whole model (see ``clover.slicing``), so the second moment is gathered at every norm's input
(each block's two norms and the final norm) and summed. Each token is normalised to unit RMS first, because that is
what the readers behind a norm see: a slicing error is an error in ``x / rms(x)``, and the few tokens with huge
activations (the first token of a window) do not get to choose the basis alone. For LayerNorm families the mean
is removed first (the norm removes it too); the all-ones direction is then kept as coordinate 0 of the basis, so
the rotated stream still carries the mean and the runtime's norm can skip it exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import adapter_for
from ..adapters.residual import ResidualLayout
from ..errors import CloverError


def stream_moment(model: nn.Module, layout: ResidualLayout, calibration: torch.Tensor, batch_size: int = 4,
                  progress: bool = True) -> tuple[torch.Tensor, int]:
    """Sum over norm sites of E[n n^T], n = the (centred, for LayerNorm) stream normalised to unit RMS; float64.

    Returns the moment and the number of calibration tokens."""
    hidden = model.get_input_embeddings().weight.shape[1]
    tokens = calibration.numel()
    if tokens < hidden:
        raise CloverError(f"calibration holds {tokens} tokens, fewer than the hidden size {hidden}: the stream's "
                          "covariance would be rank-deficient and the rotation arbitrary; raise --calib-samples or "
                          "--calib-seqlen")
    center = layout.norm == "layer"
    moment = torch.zeros(hidden, hidden, dtype=torch.float64)
    counts = {"rows": 0}

    def hook(_module, args):
        x = args[0].detach().reshape(-1, hidden).double().cpu()
        if center:
            x = x - x.mean(-1, keepdim=True)
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
        moment.add_(x.mT @ x)
        counts["rows"] += x.shape[0]

    adapter = adapter_for(model)
    handles = [model.get_submodule(site.module).register_forward_pre_hook(hook) for site in layout.all_norms()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in tqdm(range(0, calibration.shape[0], batch_size), desc="calibrating the stream",
                              unit="batch", disable=not progress):
                ids = calibration[start:start + batch_size].to(device)
                model(**adapter.calibration_inputs(model, ids))
    finally:
        for handle in handles:
            handle.remove()
    return moment / max(counts["rows"], 1), tokens


def stream_basis(moment: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal columns sorted by the stream energy along them (descending), and those energies.

    With ``center`` the first column is the all-ones direction (the stream's mean, energy 0 in the centred moment),
    and the rest are the principal directions of its orthogonal complement."""
    dim = moment.shape[0]
    if not center:
        energy, vectors = torch.linalg.eigh(moment)
        return vectors.flip(-1), energy.flip(-1).clamp_min(0)
    ones = torch.full((dim, 1), dim ** -0.5, dtype=moment.dtype)
    frame, _ = torch.linalg.qr(torch.cat([ones, torch.eye(dim, dtype=moment.dtype)], dim=1))
    frame = frame[:, :dim]
    frame[:, 0] = ones[:, 0]  # QR may flip its sign; the mean coordinate is defined with +1/sqrt(D)
    rest = frame[:, 1:]
    energy, vectors = torch.linalg.eigh(rest.mT @ moment @ rest)
    basis = torch.cat([ones, rest @ vectors.flip(-1)], dim=1)
    return basis, torch.cat([moment.new_zeros(1), energy.flip(-1).clamp_min(0)])
