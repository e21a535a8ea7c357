"""The trainable pieces CLOVER fine-tuning puts into a model, and how they become the model's weights.

A *tuner* holds, per targeted pair, frozen factors ``P`` (left) and ``Q`` (right), orthonormal at the default core
scale (``_scaled_start``), and a trainable d x d core ``C`` per KV group (or per MLP block) initialised from the
singular values, so that ``P C Q^T`` equals the original product at step 0 and any d x d update of ``C`` is a
full-rank update of the pair.

The weights are recomputed from the factors by ``torch.nn.utils.parametrize``: each affected parameter is
parametrized to "whatever the tuner computes". The tuner computes them by running the family's adapter ``write``
inside ``capture_writes``, so the layout (fused GPT-2 ``c_attn``, Conv1D orientation, GQA groups) stays known only
to the adapter. Values are computed once per forward of the owning block (a forward pre-hook fills a cache, a
forward hook empties it), so an optimiser step is always seen by the next forward.

Dropout follows LoRA's meaning: only the *update* sees dropped-out inputs, ``y = x W0 + drop(x) (W - W0)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from ..adapters import Adapter, AttentionSite
from ..adapters.base import capture_writes
from ..decompose import decompose
from ..errors import CloverError
from ..pairs import Projection, check_finite, factors, pair_width, with_factors

TUNER_NAME = "clover_tune"


class _FromTuner(nn.Module):
    """Parametrization: the parameter's value is what its tuner computes (the stored original while it reads).

    The tuner is referenced, not registered, so it appears once in the module tree and in the state dict.
    """

    def __init__(self, tuner: "Tuner"):
        super().__init__()
        self._tuner = [tuner]

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self._tuner[0].value_for(original)


def apply_weight(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s linear map with another weight and no bias (Linear stores out x in, Conv1D in x out)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    if isinstance(module, Conv1D):
        return x @ weight
    raise CloverError(f"cannot fine-tune a {type(module).__name__} projection: only nn.Linear and Conv1D are supported")


def _orthonormal_factors(left: torch.Tensor, right: torch.Tensor):
    """``(P, Q, s)`` with ``P diag(s) Q^T == left right^T`` and P, Q orthonormal columns (float64).

    Directions with a zero singular value have no defined basis vector; their columns are left at zero.
    """
    out = decompose(left, right)
    root = out.s.sqrt()
    keep = out.s > out.s.amax(dim=-1, keepdim=True).clamp_min(1e-300) * 1e-12
    inv = torch.where(keep, 1.0 / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(root))
    return out.left * inv.unsqueeze(-2), out.right * inv.unsqueeze(-2), out.s


CORE_SCALES = ("unit", "spectrum")


def _scaled_start(p: torch.Tensor, q: torch.Tensor, s: torch.Tensor, core_scale: str):
    """Frozen factors and the core's start, ``P' C0 Q'^T == P diag(s) Q^T``, for a core that Adam steps by about the
    lr per entry.

    ``unit``: orthonormal ``P``, ``Q`` and ``C0 = diag(s)``, so a step on entry (i, j) adds a unit-norm rank-one term
    whatever the singular values. ``spectrum``: ``P``, ``Q`` columns scaled by ``d = sqrt(s / mean(s))`` and
    ``C0 = diag(s / d^2)`` (``mean(s)`` on the diagonal), so the same step moves direction (i, j) in proportion to
    ``sqrt(s_i s_j) / mean(s)``: strong directions move more than weak ones, as PiSSA's adapters (built from the top
    singular vectors with sqrt(s) on each side) do, and the lr keeps its meaning on average. Zero directions (zero
    columns) stay zero. ``attach`` checks the scale is one of CORE_SCALES before any tuner is built."""
    if core_scale == "unit":
        return p, q, torch.diag_embed(s)
    mean = s.mean(dim=-1, keepdim=True).clamp_min(1e-300)
    d = (s / mean).sqrt()
    start = torch.where(s > 0, mean.expand_as(s), torch.zeros_like(s))
    return p * d.unsqueeze(-2), q * d.unsqueeze(-2), torch.diag_embed(start)


class Tuner(nn.Module):
    """Base: owns the trainable cores of one block and the parametrizations that read from them."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._reading = False
        self._cache: dict[int, torch.Tensor] | None = None
        self._targets: list[tuple[nn.Module, str]] = []
        self._handles: list = []

    # -- to be provided by subclasses
    def compute(self) -> dict[int, tuple[nn.Parameter, torch.Tensor]]:
        """``{id(original parameter): (parameter, value)}`` for every parameter this tuner writes."""
        raise NotImplementedError

    def owner(self) -> nn.Module:
        """The module whose forward brackets every use of the parametrized weights."""
        raise NotImplementedError

    # -- shared machinery
    def value_for(self, original: torch.Tensor) -> torch.Tensor:
        if self._reading:
            return original
        cache = self._cache if self._cache is not None else self._values()
        return cache[id(original)]

    def _values(self) -> dict[int, torch.Tensor]:
        return {key: value for key, (_, value) in self.compute().items()}

    def install(self) -> None:
        """Parametrize every parameter whose value depends on a trainable core; hook the owner's forward."""
        named = {id(p): (m, n) for m in self.owner().modules() for n, p in m.named_parameters(recurse=False)}
        for key, (param, value) in self.compute().items():
            if not value.requires_grad:  # frozen from now on: a one-time rewrite (V becomes its orthonormal basis)
                with torch.no_grad():
                    param.copy_(value)
                continue
            if key not in named:
                raise CloverError("internal: an adapter wrote a parameter outside its attention block")
            module, attr = named[key]
            parametrize.register_parametrization(module, attr, _FromTuner(self), unsafe=True)
            self._targets.append((module, attr))
        owner = self.owner()
        self._handles.append(owner.register_forward_pre_hook(self._fill_cache))
        if self.dropout is not None:
            for module in {id(m): m for m, attr in self._targets if attr == "weight"}.values():
                self._handles.append(module.register_forward_hook(self._dropout_update))
        self._handles.append(owner.register_forward_hook(self._clear_cache))

    def _fill_cache(self, module, args):
        self._cache = self._values()

    def _clear_cache(self, module, args, output):
        self._cache = None

    def _dropout_update(self, module, args, output):
        if not self.training:
            return output
        x = args[0]
        delta = module.weight - module.parametrizations.weight.original
        return output + apply_weight(module, self.dropout(x) - x, delta)

    def merge(self) -> None:
        """Write the current values into plain parameters and remove every trace of the tuner."""
        with torch.no_grad():
            values = self._values()
        for handle in self._handles:
            handle.remove()
        for module, attr in self._targets:
            original = module.parametrizations[attr].original
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            with torch.no_grad():
                original.copy_(values[id(original)])
        self._targets, self._handles = [], []

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Within it the parametrized weights read as their stored originals (for the adapter's read/write)."""
        self._reading = True
        try:
            yield
        finally:
            self._reading = False


def _add_bias(p: Projection, delta: torch.Tensor | None) -> Projection:
    return p if delta is None else Projection(p.weight, p.bias + delta)


class SiteTuner(Tuner):
    """One attention block: cross-layer cores for ``qk`` / ``vo`` and the intra-layer QR core ``k``.

    ``qk`` / ``vo``: per KV group, ``left = P C`` and ``right = Q`` with C initialised to ``diag(s)`` (``core_scale``
    "spectrum": ``P``, ``Q`` scaled, see ``_scaled_start``). C is only as
    wide as the product's rank can be (``pairs.pair_width``): where K or V reads a latent narrower than the head,
    wider cores would hold entries no gradient reaches; the factors are zero-padded back to the head dim.
    ``k`` (rotary models, where Q-K is not exact): the homogeneous K of each KV group is ``Q_k R_k`` (thin QR);
    ``R_k`` is the trainable core, a d x d map applied before the rotary embedding.
    ``rope`` (heads sharing one rotated key, ``Adapter.shared_rope_query``): the same QR form on each head's rotated
    query rows, ``W_h^T = Q_h R_h``, ``R_h`` trained; the shared key, which every head reads, stays as is.
    With ``train_bias``, every bias of the block gets a trainable offset (the paper's CLOVER-dagger).
    """

    def __init__(self, adapter: Adapter, site: AttentionSite, kinds: tuple[str, ...], dropout: float = 0.0,
                 train_bias: bool = False, initialise: bool = True, core_scale: str = "unit"):
        super().__init__(dropout)
        self._adapter = adapter
        self._site = [site]  # a list: the site's module is our parent, not a child
        self.kinds = kinds
        w = adapter.read(site)
        if initialise:
            check_finite(w, site)
        dtype, device = w.q.weight.dtype, w.q.weight.device
        for kind in kinds:
            if kind == "rope":
                self._init_rope(adapter, site, initialise)
                continue
            pair = "qk" if kind == "k" else kind
            left, right = factors(w, pair)
            if kind == "k":
                if initialise:
                    basis, core = torch.linalg.qr(right.double())
                else:
                    basis, core = torch.zeros(right.shape), torch.zeros(right.shape[0], *right.shape[-1:] * 2)
                self.register_buffer("k_right", basis.to(dtype=dtype, device=device).contiguous())
                self.register_parameter("k_core", nn.Parameter(core.to(dtype=dtype, device=device)))
                continue
            width = pair_width(w, kind)
            if initialise:
                p, q, s = _orthonormal_factors(left, right)
                p, q, core = _scaled_start(p[..., :width], q[..., :width], s[..., :width], core_scale)
            else:
                p, q = torch.zeros(*left.shape[:-1], width), torch.zeros(*right.shape[:-1], width)
                core = torch.zeros(left.shape[0], width, width)
            self.register_buffer(f"{kind}_left", p.to(dtype=dtype, device=device).contiguous())
            self.register_buffer(f"{kind}_right", q.to(dtype=dtype, device=device).contiguous())
            self.register_parameter(f"{kind}_core", nn.Parameter(core.to(dtype=dtype, device=device)))
        self.bias_names = []
        if train_bias:
            for name in ("q", "k", "v", "o"):
                bias = getattr(w, name).bias
                if bias is not None:
                    self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros_like(bias)))
                    self.bias_names.append(name)

    def _init_rope(self, adapter: Adapter, site: AttentionSite, initialise: bool) -> None:
        query, rows = adapter.shared_rope_query(site)
        weight = query.weight.detach()
        self._rope_query = [query]
        self.register_buffer("rope_rows", rows.to(weight.device), persistent=False)
        heads, rope = rows.shape
        if initialise:
            basis, core = torch.linalg.qr(weight[rows].mT.double())  # (heads, D, rope), (heads, rope, rope)
        else:
            basis, core = torch.zeros(heads, weight.shape[1], rope), torch.zeros(heads, rope, rope)
        self.register_buffer("rope_right", basis.to(dtype=weight.dtype, device=weight.device).contiguous())
        self.rope_core = nn.Parameter(core.to(dtype=weight.dtype, device=weight.device))

    def _with_rope(self, captured: dict) -> dict:
        """The query weight as written so far, with every head's rotated rows recomputed from its core."""
        with self.reading():
            original = self._rope_query[0].weight
        _, value = captured.get(id(original), (original, original))
        rows = (self.rope_right @ self.rope_core).mT.reshape(-1, value.shape[1])
        captured[id(original)] = (original, value.index_put((self.rope_rows.reshape(-1),), rows.to(value.dtype)))
        return captured

    def owner(self) -> nn.Module:
        return self._site[0].module

    def compute(self):
        pairs = tuple(kind for kind in self.kinds if kind != "rope")  # rope rows lie outside the adapter's weights
        captured = self._pair_writes(pairs) if pairs or self.bias_names else {}  # rope alone: no read / write
        return self._with_rope(captured) if "rope" in self.kinds else captured

    def _pair_writes(self, pairs: tuple[str, ...]) -> dict:
        """What the adapter writes for the block with every pair's core (and bias offset) applied."""
        site = self._site[0]
        with self.reading():
            w = self._adapter.read(site)
        for kind in pairs:
            core = getattr(self, f"{kind}_core")
            if kind == "k":
                left, _ = factors(w, "qk")
                w = with_factors(w, "qk", left, self.k_right @ core)
            else:
                dim = w.qk_dim if kind == "qk" else w.vo_dim
                pad = (0, dim - core.shape[-1])  # zero directions beyond the product's rank (pair_width)
                w = with_factors(w, kind, F.pad(getattr(self, f"{kind}_left") @ core, pad),
                                 F.pad(getattr(self, f"{kind}_right"), pad))
        if self.bias_names:
            w = replace(w, **{n: _add_bias(getattr(w, n), getattr(self, f"{n}_bias")) for n in self.bias_names})
        with self.reading(), capture_writes() as captured:
            self._adapter.write(site, w)
        return captured


class BlockTuner(Tuner):
    """An MLP up projection cut into head-sized blocks of output rows (the paper's U-D term).

    Each block ``W_b`` (d x D) is ``P diag(s) Q^T`` by a thin SVD; ``C`` (d x d) replaces ``diag(s)`` (``core_scale``
    as in ``SiteTuner``).
    """

    def __init__(self, module: nn.Module, block: int, dropout: float = 0.0, train_bias: bool = False,
                 initialise: bool = True, core_scale: str = "unit"):
        super().__init__(dropout)
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise CloverError(f"cannot fine-tune a {type(module).__name__} MLP projection: "
                              "only nn.Linear and Conv1D are supported")
        self._module = [module]
        weight = module.weight.detach()
        weight = weight.T if isinstance(module, Conv1D) else weight  # (out, in)
        rows, cols = weight.shape
        if rows % block:
            raise CloverError(f"MLP up projection has {rows} outputs, not a multiple of the block size {block}: "
                              "drop 'up' from the targets")
        blocks = weight.reshape(rows // block, block, cols)
        if initialise:
            u, s, vh = torch.linalg.svd(blocks.double(), full_matrices=False)
            left, right, core = _scaled_start(u, vh.mT, s, core_scale)
        else:
            left = torch.zeros(rows // block, block, block)
            right, core = torch.zeros(rows // block, cols, block), torch.zeros(rows // block, block, block)
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.register_buffer("up_left", left.to(**kw).contiguous())
        self.register_buffer("up_right", right.to(**kw).contiguous())
        self.up_core = nn.Parameter(core.to(**kw))
        if train_bias and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)

    def owner(self) -> nn.Module:
        return self._module[0]

    def compute(self):
        module = self._module[0]
        blocks = self.up_left @ self.up_core @ self.up_right.mT  # (n, d, D)
        weight = blocks.reshape(-1, blocks.shape[-1])
        if isinstance(module, Conv1D):
            weight = weight.T
        with self.reading():
            original = module.weight
        return {id(original): (original, weight)}
