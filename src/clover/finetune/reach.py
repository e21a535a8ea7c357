"""``project_``: how much of another tuner's change CLOVER's cores could have made, and the model they make of it.

A CLOVER core moves a pair's product only inside the span of its frozen factors: ``P C Q^T`` for any d x d ``C``,
``P`` and ``Q`` fixed by the start's SVD. A LoRA update has no such fence (it is rank-limited, not span-limited).
``project_`` takes a start model and a tuned copy of it (any method, merged), attaches CLOVER tuners to the start,
sets every core to the least-squares fit of the tuned weights and merges: the result is the closest model CLOVER
could have reached on those targets, and the report gives, per target, the share of the tuned change that no core
can express. A change CLOVER made itself is inside by construction (share 0, the same model back).

The fit is weighted by what each side reads (``input_moments``): a pair's error ``E`` costs ``tr(A E B E^T)`` with
``A`` / ``B`` the second moments of the inputs of its two sides (a side that writes the residual stream, the output
of V-O or the MLP up block, counts as identity), so directions the calibration text never drives cost nothing.
Without moments every direction counts the same (the Frobenius norm of the weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..adapters import adapter_for
from ..calibrate import collect, homogeneous_moment
from ..errors import CloverError
from ..pairs import factors
from .attach import STATE_ATTR, TuneConfig, attach, merge_
from .modules import BlockTuner, SiteTuner
from .targets import resolve_targets

PROJECTABLE = ("qk", "vo", "rope", "up")  # the singular-value cores and the rope QR cores; not ``k`` (see below)


@dataclass
class ReachReport:
    targets: tuple[str, ...]
    weighted: bool  # fitted under the inputs' second moments (else the weights' Frobenius norm)
    outside: dict[str, float] = field(default_factory=dict)  # target -> share of the change's energy out of reach
    changed: dict[str, float] = field(default_factory=dict)  # target -> energy of the tuned change (same metric)

    def to_dict(self) -> dict:
        return asdict(self)


def _projectable(model: nn.Module, targets) -> tuple[str, ...]:
    """``targets`` resolved against the model, refused (before anything changes) where no core fits: the ``k``
    target's QR core acts on K alone, so a tuned Q would stay out of reach whatever it did."""
    _, _, targets = resolve_targets(model, targets)
    other = [t for t in targets if t not in PROJECTABLE]
    if other:
        raise CloverError(f"target(s) {other} have no projection onto CLOVER cores: use some of "
                          f"{', '.join(PROJECTABLE)}")
    return targets


def input_moments(model: nn.Module, batches: torch.Tensor, targets) -> dict[str, torch.Tensor]:
    """``E[[x, 1][x, 1]^T]`` (float64) of what every side of the targets reads, over ``batches`` (n, seqlen) of token
    ids: the weights of ``project_``'s fit. The attention sides are ``calibrate.collect``'s statistics (the query's
    input, and the K/V input, keyed ``<site>:query`` / ``<site>:kv``); the MLP up blocks' inputs are hooked beside
    them with the same sum, keyed by module name. The homogeneous 1 is last, as in ``pairs``' factors."""
    targets = _projectable(model, targets)
    adapter = adapter_for(model)
    sums: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args, _out):
            sums[name] = sums[name] + homogeneous_moment(args[0]) if name in sums else homogeneous_moment(args[0])
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in (adapter.mlp_up(model) if "up" in targets else [])]
    was_training = model.training
    model.eval()  # the statistics of the model as it runs, without dropout
    try:
        stats = collect(model, adapter, adapter.sites(model), batches, progress=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {n: total / stats.tokens for n, total in sums.items()}  # every token passes every MLP
    for name, st in stats.sites.items():
        out[f"{name}:query"], out[f"{name}:kv"] = st.q_input, st.kv_input
    return out


def _side(moments: dict | None, name: str, rows: int, repeat: int = 1) -> torch.Tensor | None:
    """The metric of a factor's rows: ``repeat`` blocks of the input moment, cut to the factor's rows per block
    (the homogeneous row only where the projection has a bias)."""
    if moments is None:
        return None
    per = rows // repeat
    m = moments[name]
    m = m if per == m.shape[0] else m[:per, :per]
    return torch.block_diag(*[m] * repeat) if repeat > 1 else m


def _solve(p: torch.Tensor, q: torch.Tensor, target: torch.Tensor, a=None, b=None):
    """``C`` minimising ``tr(A E B E^T)``, ``E = target - P C Q^T``, per leading index; and the residual ``E``.
    ``A`` / ``B`` None: identity."""
    p, q, target = p.double(), q.double(), target.double()
    ap = p if a is None else a.double() @ p
    bq = q if b is None else b.double() @ q
    core = torch.linalg.pinv(p.mT @ ap) @ ap.mT @ target @ bq @ torch.linalg.pinv(q.mT @ bq)
    return core, target - p @ core @ q.mT


def _energy(e: torch.Tensor, a=None, b=None) -> float:
    """``sum tr(A E B E^T)`` over the leading index."""
    left = e if a is None else a.double() @ e
    right = e if b is None else e @ b.double()
    return float((left * right).sum())


def project_(start: nn.Module, tuned: nn.Module, targets, moments: dict | None = None) -> ReachReport:
    """Turn ``start`` (in place) into the closest model its CLOVER cores on ``targets`` can reach to ``tuned`` (a
    merged tuning of a copy of ``start``: same architecture and names); report what stays out of reach.

    ``moments`` (``input_moments`` of ``start``) weights the fit by what each side reads; None fits the weights."""
    shapes = {name: p.shape for name, p in start.named_parameters()}
    if type(start) is not type(tuned) or {name: p.shape for name, p in tuned.named_parameters()} != shapes:
        raise CloverError("the tuned model is not a tuning of the start model (another class, or other parameters "
                          "or shapes): pass the merged tuning of a copy of the start model")
    targets = _projectable(start, targets)
    attach(start, TuneConfig(targets=targets, core_scale="unit", verify=False, progress=False))
    state = getattr(start, STATE_ATTR)
    adapter = adapter_for(tuned)
    tuned_sites = {site.name: site for site in adapter.sites(tuned)}
    names = {id(m): n for n, m in start.named_modules()}
    outside: dict[str, float] = {}
    changed: dict[str, float] = {}

    def fit(target_name, tuner, core_name, p, q, goal, a=None, b=None):
        core = getattr(tuner, core_name)
        start_value = p.double() @ core.double() @ q.double().mT
        solved, residual = _solve(p, q, goal, a, b)
        core.copy_(solved.to(core.dtype))
        outside[target_name] = outside.get(target_name, 0.0) + _energy(residual, a, b)
        changed[target_name] = changed.get(target_name, 0.0) + _energy(goal.double() - start_value, a, b)

    with torch.no_grad():  # after attach, which parametrizes only what requires gradients
        for tuner in state.tuners:
            if isinstance(tuner, BlockTuner):
                name = names[id(tuner.owner())]
                weight = tuned.get_submodule(name).weight
                blocks = weight.reshape(tuner.up_left.shape[0], tuner.up_left.shape[1], -1)
                fit("up", tuner, "up_core", tuner.up_left, tuner.up_right, blocks,
                    b=_side(moments, name, blocks.shape[-1]))
                continue
            if not isinstance(tuner, SiteTuner):
                raise CloverError(f"internal: no projection for a {type(tuner).__name__}")
            site = tuner._site[0]
            w = adapter.read(tuned_sites[site.name])
            for kind in tuner.kinds:
                if kind == "rope":
                    query, rows = adapter.shared_rope_query(tuned_sites[site.name])
                    goal = query.weight[rows].mT  # (heads, D, rope): W_h^T = basis_h @ core_h
                    eye = torch.eye(goal.shape[-1], dtype=goal.dtype, device=goal.device).expand_as(tuner.rope_core)
                    fit("rope", tuner, "rope_core", tuner.rope_right, eye, goal,  # the query's rows: its input
                        a=_side(moments, f"{site.name}:query", goal.shape[1]))
                    continue
                left, right = factors(w, kind)
                goal = left @ right.mT
                p, q = getattr(tuner, f"{kind}_left"), getattr(tuner, f"{kind}_right")
                if kind == "qk":  # left: the query's input per head of the group; right: the key's input
                    a = _side(moments, f"{site.name}:query", left.shape[1], w.group_size)
                    b = _side(moments, f"{site.name}:kv", right.shape[1])
                else:  # left: the output's rows (the residual stream, identity); right: the value's input
                    a, b = None, _side(moments, f"{site.name}:kv", right.shape[1])
                fit(kind, tuner, f"{kind}_core", p, q, goal, a, b)
    merge_(start, verify=False)
    shares = {t: outside[t] / changed[t] if changed[t] > 0 else 0.0 for t in outside}
    return ReachReport(tuple(state.targets), moments is not None, shares, changed)
