"""Activation statistics for data-aware pruning, gathered with forward hooks on the projection modules.

Per attention block we keep second moments (not centred: the bias column is the constant 1) of
- the inputs the Q and the K/V projections read, with a homogeneous 1 appended (whitening of Q-K and V-O);
- the attention output each head hands to O, i.e. the attention-mixed values (optional V-O whitening that
  sees what softmax really does with V);
- the mean square of every q and k channel before rotary embeddings (rotary-pair scores; the rotation keeps
  the energy of a frequency pair, so pre-rotation squares score it exactly).
Statistics accumulate in float64, so the order of batches does not matter beyond rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, AttentionSite
from .errors import CloverError


@dataclass
class SiteStats:
    q_input: torch.Tensor | None = None  # (D_q+1, D_q+1)
    kv_input: torch.Tensor | None = None  # (D_kv+1, D_kv+1)
    head_output: torch.Tensor | None = None  # (H, d_vo, d_vo): per head, second moment of o_proj's input
    q_channel_sq: torch.Tensor | None = None  # (H * d_qk,)
    k_channel_sq: torch.Tensor | None = None  # (H_kv * d_qk,)
    tokens: int = 0  # rows the Q projection read
    kv_tokens: int = 0  # rows the K projection read, cross-attention only (e.g. encoder frames)


@dataclass
class Calibration:
    sites: dict[str, SiteStats] = field(default_factory=dict)
    tokens: int = 0


def homogeneous_moment(x: torch.Tensor) -> torch.Tensor:
    """``sum [x, 1]^T [x, 1]`` over every row of ``x`` (float64): the sum behind each input statistic here."""
    x = x.reshape(-1, x.shape[-1]).double()
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    xh = torch.cat([x, ones], dim=1)
    return xh.T @ xh


def _add(current: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if current is None else current + new


def collect(model: nn.Module, adapter: Adapter, sites: list[AttentionSite], batches: torch.Tensor, *,
            inputs: bool = True, head_outputs: bool = False, channels: bool = False,
            progress: bool = True) -> Calibration:
    """Run ``batches`` (n, seqlen) of token ids through ``model`` and return per-site statistics (means)."""
    stats = {site.name: SiteStats() for site in sites}
    hooks = attach(adapter, sites, stats, inputs=inputs, head_outputs=head_outputs, channels=channels)
    feed(model, adapter, batches, hooks, "calibration", progress)
    return finish(stats, batches.numel())


def feed(model: nn.Module, adapter: Adapter, batches: torch.Tensor, hooks: list, desc: str,
         progress: bool = True) -> None:
    """Run each window of ``batches`` (n, seqlen) through ``model`` without gradients, for what ``hooks`` (handles
    already registered) record; the hooks are removed afterwards, whatever happens."""
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for row in tqdm(batches, desc=desc, unit="sample", disable=not progress):
                model(**adapter.calibration_inputs(model, row[None].to(device)))
    finally:
        for h in hooks:
            h.remove()


def attach(adapter: Adapter, sites: list[AttentionSite], stats: dict[str, SiteStats], *, inputs: bool = True,
           head_outputs: bool = False, channels: bool = False) -> list:
    """Register the statistic-gathering hooks on every site's projections; the caller removes the handles.

    Separate from ``collect`` so a layer-by-layer run (clover.streaming) gathers exactly the same sums on one
    decoder layer at a time.
    """
    hooks = []

    def register(module: nn.Module, fn):
        hooks.append(module.register_forward_hook(fn))

    for site in sites:
        st, mods = stats[site.name], adapter.projections(site)
        head_dims = adapter.read(site)
        qk_width = head_dims.q.weight.shape[0]
        k_width = head_dims.k.weight.shape[0]
        if inputs:
            def q_in(_m, args, _out, st=st):
                st.q_input = _add(st.q_input, homogeneous_moment(args[0]))
                st.tokens += args[0].shape[:-1].numel()

            register(mods["q"], q_in)
            if site.separate_kv_input:  # else Q, K and V read the same states
                def kv_in(_m, args, _out, st=st):
                    st.kv_input = _add(st.kv_input, homogeneous_moment(args[0]))
                    st.kv_tokens += args[0].shape[:-1].numel()

                register(mods["k"], kv_in)
        if head_outputs:
            heads, vo = site.num_heads, head_dims.vo_dim

            def o_in(_m, args, _out, st=st, heads=heads, vo=vo):
                u = args[0].reshape(-1, heads, vo).double().transpose(0, 1)  # (H, tokens, d)
                st.head_output = _add(st.head_output, u.mT @ u)

            register(mods["o"], o_in)
        if channels:
            fused = mods["q"] is mods["k"]

            def q_out(_m, _args, out, st=st, fused=fused, qk_width=qk_width, k_width=k_width):
                flat = out.reshape(-1, out.shape[-1]).double()
                st.q_channel_sq = _add(st.q_channel_sq, flat[:, :qk_width].pow(2).sum(0))
                if fused:
                    st.k_channel_sq = _add(st.k_channel_sq, flat[:, qk_width:qk_width + k_width].pow(2).sum(0))

            register(mods["q"], q_out)
            if not fused:
                def k_out(_m, _args, out, st=st):
                    st.k_channel_sq = _add(st.k_channel_sq, out.reshape(-1, out.shape[-1]).double().pow(2).sum(0))

                register(mods["k"], k_out)

    return hooks


def finish(stats: dict[str, SiteStats], total: int) -> Calibration:
    """Sums over ``total`` tokens -> means (in place), wrapped as a ``Calibration``."""
    if total == 0:
        raise CloverError("calibration got no tokens: pass --calib-samples and --calib-seqlen above zero")
    for st in stats.values():
        # Means over the rows each side really saw: an encoder or a cross-attention's K/V side sees other rows
        # (audio frames, image patches) than the calibration text has tokens.
        q_rows = st.tokens or total
        kv_rows = st.kv_tokens or q_rows
        for name in ("q_input", "kv_input", "head_output", "q_channel_sq", "k_channel_sq"):
            value = getattr(st, name)
            if value is not None:
                setattr(st, name, value / (kv_rows if name in ("kv_input", "k_channel_sq") else q_rows))
        if st.kv_input is None:
            st.kv_input = st.q_input
    return Calibration(stats, total)


def cholesky_factor(cov: torch.Tensor, jitter: float = 1e-6, name: str = "", warn=None) -> torch.Tensor:
    """Lower Cholesky factor of ``cov + eps I`` with eps relative to the mean diagonal, growing until it works."""
    scale = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    eps = jitter
    for attempt in range(8):
        chol, info = torch.linalg.cholesky_ex(cov + (eps * scale)[..., None, None] * eye)
        if not bool(info.any()):
            if attempt and warn is not None:
                warn(f"{name}: covariance not positive definite; Cholesky succeeded with relative jitter {eps:.0e}")
            return chol
        eps *= 10
    raise CloverError(f"{name}: Cholesky of the calibration covariance failed even with jitter {eps:.0e}; "
                      "use more calibration samples (--calib-samples) or the weight-only criterion 'clover'")
