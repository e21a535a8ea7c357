"""Pure tensor math of slicing: fold every norm's scale (and shift) into its readers, rotate everything that
touches the stream into the new basis, keep its first ``width`` coordinates. No model knowledge: the family's
``ResidualLayout`` names the tensors and the axis of each that has the hidden size.

Row-vector convention: the stream ``x`` becomes ``y = x Q`` (``Q``: D x width, orthonormal columns), and
``x ~ y Q^T``. A reader ``W`` of ``g * n(x) + b`` becomes ``(W * g) Q`` along its hidden axis and takes ``W b`` into
its bias; a writer, an embedding table and a bias on the stream become ``W Q`` along theirs. A final norm whose head
cannot take the fold (a tied head, or a LayerNorm shift before a bias-free head) ends in the square map
``Q^T diag(g) Q`` (bias ``b Q``), and the head is the rotated table.
"""

from __future__ import annotations

import torch

from ..adapters.residual import ResidualLayout


def turn(tensor: torch.Tensor, axis: int, basis: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its ``axis`` (size D) contracted with ``basis`` (D x width)."""
    return (tensor.movedim(axis, -1) @ basis).movedim(-1, axis)


def _scaled(tensor: torch.Tensor, axis: int, scale: torch.Tensor) -> torch.Tensor:
    shape = [1] * tensor.dim()
    shape[axis] = -1
    return tensor * scale.reshape(shape)


def projection_key(layout: ResidualLayout) -> str:
    return f"{layout.final.module}.proj"


def needs_projection(layout: ResidualLayout) -> bool:
    """Whether the final norm ends in a square map: its readers could not take the fold."""
    return not layout.final.readers


def sliced_state(state: dict[str, torch.Tensor], layout: ResidualLayout, basis: torch.Tensor,
                 norm_weight: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The rewritten tensors (everything the layout names; the rest of the model is unchanged), in ``dtype``.

    ``basis``: D x width in the compute dtype. ``norm_weight``: what every stream norm's scale becomes (the rms
    families keep the original norm's divisor through it, see ``families``)."""
    q = basis
    out: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        return state[key].to(q.dtype)

    for key in layout.embeddings:
        out[key] = turn(get(key), 1, q)
    for port in layout.writers:
        out[port.key] = turn(get(port.key), port.axis, q)
        if port.bias is not None:
            out[port.bias] = get(port.bias) @ q
    width = q.shape[1]
    for site in layout.all_norms():
        gain = get(site.weight)
        shift = get(site.bias) if site.bias is not None else None
        for port in site.readers:
            weight = get(port.key)
            out[port.key] = turn(_scaled(weight, port.axis, gain), port.axis, q)
            if shift is not None:
                out[port.bias] = get(port.bias) + torch.tensordot(weight, shift, dims=([port.axis], [0]))
        out[site.weight] = torch.full((width,), norm_weight, dtype=q.dtype)
    if needs_projection(layout):
        final = layout.final
        key = projection_key(layout)
        out[f"{key}.weight"] = q.mT @ _scaled(q, 0, get(final.weight))  # symmetric: Linear's (out, in) is itself
        if final.bias is not None:
            out[f"{key}.bias"] = get(final.bias) @ q
        out[layout.head] = out[layout.embeddings[0]] if layout.tied else turn(get(layout.head), 1, q)
    return {k: v.to(dtype) for k, v in out.items()}
