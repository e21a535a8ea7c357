"""``slice_``: rotate the residual stream by its principal directions and keep the strongest ``width`` of them.

Flow: the family's adapter names every tensor touching the stream (``ResidualLayout``) -> calibration gives the
stream's second moment at every norm -> one basis for the whole model -> fold and rotate the tensors -> the family's
runtime holds the narrower model. The full-width rotation is built first and checked against the original logits
(it is an exact change of basis), then the same rewrite is cut to the kept width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..adapters import adapter_for
from ..errors import CloverError
from ..sizes import SizeReport, kv_bytes_per_token, parameter_count
from ..verify import compare, model_outputs
from . import families
from .config import SliceConfig
from .pca import stream_basis, stream_moment
from .rewrite import needs_projection, sliced_state


@dataclass
class SliceReport(SizeReport):
    model_type: str
    runtime: str
    hidden_before: int
    hidden_after: int
    ratio: float
    ratio_applied: float
    energy_kept: float  # share of the calibration stream's (RMS-normalised) energy in the kept directions
    check: dict | None = None  # the full-width rotation against the original (verify.Check)


def slice_(model: nn.Module, config: SliceConfig) -> tuple[nn.Module, SliceReport]:
    """Return a copy of ``model`` whose hidden dimension is ``(1 - ratio)`` as wide (rounded to ``multiple_of``),
    and what was done. ``model`` is left as it was."""
    config.check()
    layout = adapter_for(model).residual_layout(model)
    families.check_family(model, layout)
    if config.calibration is None:
        raise CloverError("slicing needs calibration text: pass token ids as SliceConfig(calibration=...) (the CLI "
                          "draws them from the validation split)")
    hidden = model.get_input_embeddings().weight.shape[1]
    center = layout.norm == "layer"
    width, rounded = config.width(hidden, reserved=1 if center else 0, family_step=families.width_step(model.config))

    moment, tokens = stream_moment(model, layout, config.calibration, config.batch_size, config.progress)
    basis, energy = stream_basis(moment.to(config.compute_dtype), center)
    state = model.state_dict()
    dtype = next(model.parameters()).dtype
    notes = [
        "one rotation for the whole residual stream (no shortcut matrices): every block reads and writes the same "
        "basis, so the skip connections need nothing, and the sliced model is a plain runtime of its family",
    ]
    if rounded:
        notes.append(rounded)
    if needs_projection(layout):
        why = "tied to the embedding, which stays one table" if layout.tied else "the head takes no bias"
        shift = " and shift" if layout.final.bias else ""
        notes.append(f"the final norm's scale{shift} became a {width} x {width} map before the head ({why})")
    notes.append("the KV cache is unchanged by slicing (keys and values keep their width); prune or convert to latent "
                 "KV on top to shrink it")

    check = None
    if config.verify:
        full = families.build(model, layout, hidden, sliced_state(state, layout, basis, 1.0, dtype))
        inputs = adapter_for(model).example_inputs(model)
        check = compare(model_outputs(model, inputs), full, inputs)
        del full
        if not check.passed:
            raise CloverError(f"internal: the full-width rotation changed the logits by {check.relative_diff:.1e} of "
                              f"their scale (tolerance {check.tolerance:.0e}); nothing was written")
    kept = basis[:, :width]
    tensors = sliced_state(state, layout, kept, families.norm_weight(layout, hidden, width), dtype)
    sliced = families.build(model, layout, width, tensors)
    report = SliceReport(
        model_type=model.config.model_type, runtime=sliced.config.model_type, hidden_before=hidden,
        hidden_after=width, ratio=config.ratio, ratio_applied=1 - width / hidden,
        energy_kept=float(energy[:width].sum() / energy.sum().clamp_min(1e-30)),
        params_before=parameter_count(model), params_after=parameter_count(sliced),
        kv_bytes_per_token_before=kv_bytes_per_token(model), kv_bytes_per_token_after=kv_bytes_per_token(sliced),
        calibration_tokens=tokens, check=None if check is None else check.to_dict(), notes=notes)
    return sliced, report

