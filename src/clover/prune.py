"""``prune``: a smaller model with a smaller KV cache, built from the criterion's best head directions.

Flow: calibrate (if the criterion is data-aware) -> one ``Candidate`` per block and pair -> ranks -> truncated
factors -> a fresh model of the pruned class (``clover_<family>``), so what we return is exactly what
``from_pretrained`` will rebuild from the saved files. The input model is left untouched (sweeps reuse it).
Every written block is checked: its Q-K and V-O products must equal the intended truncation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibrate, heldout, modeling, sequential
from .adapters import Adapter, AttentionSite, adapter_for, model_type
from .calibrate import SiteStats
from .criteria import CRITERIA, DATA_AWARE, ROTARY_CRITERIA, Candidate, candidate
from .errors import CloverError
from .pairs import AttentionWeights, PairKind, cast_like, check_finite, factors, with_factors
from .ranks import check_ratio, choose, global_removal, kept_below_threshold, uniform_keep
from .rebuild import DROPPED_SETTINGS, copy_matching, keep_buffer_dtypes
from .sizes import SizeReport, kv_bytes_per_token, parameter_count


@dataclass
class StackPlan:
    """How much to prune in one attention stack (Whisper: ``encoder``, ``decoder``, ``cross``): users cut the
    encoder for compute, the decoder's self-attention for its KV cache, and cross-attention differently again."""

    qk_ratio: float = 0.0
    vo_ratio: float = 0.0
    qk_threshold: float | None = None
    vo_threshold: float | None = None


VO_WHITENINGS = ("auto", "mixed", "input")
VO_WHITENING_CHOICES = (("mixed", True), ("mixed", False), ("input", False))  # what auto tries, in this order


@dataclass
class PruneConfig:
    """What to remove and how to choose it. Ratios are the fraction of head dims removed in [0, 1).

    ``criterion`` applies to both pairs; ``qk_criterion`` overrides it for Q-K (rotary models need
    ``rotary-weight`` or ``rotary-activation``). Thresholds are absolute singular values and replace the ratio
    for their pair. ``calibration`` holds token ids (n, seqlen) for data-aware criteria. ``vo_whitening`` picks
    what whitens V-O: ``mixed`` (the attention-mixed values each head hands to O, then a per-head least-squares
    refit of O unless ``vo_refit`` is off), ``input`` (the layer's input, as in the prototype), or ``auto`` (the
    default): each of mixed + refit, mixed and input prunes from the first windows and the one whose outputs stay
    closest to the original's on the last ``holdout`` windows is kept. Which wins depends on the model (mixed won
    on SmolLM2, input on a real Whisper encoder), so it is chosen from data.
    ``sequential`` gathers each layer's statistics with the earlier layers already pruned (``clover.sequential``).
    ``stacks`` (models with several attention stacks) replaces the four top-level amounts: only the stacks it
    names are pruned, each by its own ``StackPlan``.
    """

    qk_ratio: float = 0.0
    vo_ratio: float = 0.0
    criterion: str = "clover"
    qk_criterion: str | None = None
    qk_threshold: float | None = None
    vo_threshold: float | None = None
    allocation: str = "uniform"
    calibration: torch.Tensor | None = None
    vo_whitening: str = "auto"
    vo_refit: bool = True
    holdout: int = 4
    sequential: bool = False
    compute_dtype: torch.dtype = torch.float64
    progress: bool = True
    stacks: dict[str, StackPlan] | None = None

    def pair_criterion(self, kind: PairKind) -> str:
        return (self.qk_criterion or self.criterion) if kind == "qk" else self.criterion

    def _plan(self, stack: str | None):
        """Where the amounts for ``stack`` live: its StackPlan (an empty one if unnamed), or the config itself."""
        if self.stacks is None or stack is None:
            return self
        return self.stacks.get(stack, StackPlan())

    def ratio_for(self, kind: PairKind, stack: str | None = None) -> float:
        plan = self._plan(stack)
        return plan.qk_ratio if kind == "qk" else plan.vo_ratio

    def threshold_for(self, kind: PairKind, stack: str | None = None) -> float | None:
        plan = self._plan(stack)
        return plan.qk_threshold if kind == "qk" else plan.vo_threshold

    def active_in(self, kind: PairKind, stack: str | None = None) -> bool:
        return self.threshold_for(kind, stack) is not None or self.ratio_for(kind, stack) > 0

    def active(self, kind: PairKind) -> bool:
        """Whether ``kind`` is pruned anywhere (in some stack, when stacks are named)."""
        if self.stacks is not None:
            return any(self.active_in(kind, stack) for stack in self.stacks)
        return self.active_in(kind)

    def check(self) -> None:
        """What can be said of the settings alone, before any model loads: ratios in range, thresholds
        non-negative and not mixed with a ratio for the same pair, and something to prune at all."""
        if self.stacks is not None:
            if self.qk_ratio or self.vo_ratio or self.qk_threshold is not None or self.vo_threshold is not None:
                raise CloverError("--stack names the amount for each stack: drop --qk-ratio / --vo-ratio / "
                                  "--qk-threshold / --vo-threshold, or drop --stack")
            if self.sequential or self.allocation == "global":
                raise CloverError("--stack prunes each named stack by its own amount: use it with --allocation "
                                  "uniform and without --sequential")
        for stack in (self.stacks or {None: None}):
            flag = "--" if stack is None else f"--stack {stack}:"
            for kind in ("qk", "vo"):
                check_ratio(self.ratio_for(kind, stack), f"{flag}{kind}-ratio")
                threshold = self.threshold_for(kind, stack)
                if threshold is None:
                    continue
                if not threshold >= 0:  # also catches NaN
                    raise CloverError(f"{flag}{kind}-threshold {threshold} is negative: it is the smallest singular "
                                      "value kept, so use a value >= 0")
                if self.ratio_for(kind, stack) > 0:
                    raise CloverError(f"{flag}{kind}-ratio and {flag}{kind}-threshold both given: a threshold "
                                      "chooses the ranks by itself, so pass one of them")
        if not (self.active("qk") or self.active("vo")):
            raise CloverError("nothing to prune: pass --qk-ratio and/or --vo-ratio (a fraction of head dims to "
                              "remove, e.g. 0.25), or --qk-threshold / --vo-threshold")

    def check_against(self, model_config) -> None:
        """The ratios against the heads' widths from ``config.json`` alone, so that a ratio leaving a head no dims
        is refused before any weights load or calibration runs (the rule ``ranks.choose`` applies later)."""
        if self.stacks is not None:
            return
        for kind in ("qk", "vo"):
            ratio = self.ratio_for(kind)
            if self.threshold_for(kind) is not None or not ratio:
                continue
            check_units(model_config, kind, ratio, self.pair_criterion(kind), self.allocation, f"--{kind}-ratio")


def head_units(model_config, kind: PairKind, criterion: str) -> int | None:
    """Units per head of ``kind`` (dims, or rotary pairs for the rotary criteria) read from a config alone, for the
    single-stack families whose heads all share one width; None where the config does not say it plainly."""
    model_type = getattr(model_config, "model_type", "")
    if model_type == "deepseek_v2":
        width = model_config.qk_nope_head_dim if kind == "qk" else model_config.v_head_dim
    elif model_type in ("llama", "mistral", "qwen2", "gpt2", "bert"):
        heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", None)
        hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
        width = getattr(model_config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    else:  # several stacks, or per-layer widths (clover_* runtimes): the adapter knows them once loaded
        return None
    if width is None:
        return None
    return width // 2 if kind == "qk" and criterion in ROTARY_CRITERIA else width


def check_units(model_config, kind: PairKind, ratio: float, criterion: str, allocation: str, flag: str) -> None:
    """Refuse ``ratio`` where it leaves a head (``uniform``) or a layer (``global``) of ``kind`` no units."""
    units = head_units(model_config, kind, criterion)
    if units is None:
        return
    if allocation == "global":
        layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", None) or 1
        global_removal([units] * layers, ratio, flag)
    else:
        uniform_keep(units, ratio, flag)


@dataclass
class LayerRanks:
    site: str
    layer: int
    qk_dim: int
    vo_dim: int
    qk_before: int
    vo_before: int
    rope_pairs: list[list[int]] | None = None
    stack: str = ""  # the site's stack: its dims go to <stack>_qk_dims / <stack>_vo_dims of the pruned config
    qk_below_threshold: int = 0  # threshold pruning: directions at or below the threshold kept (see ranks)
    vo_below_threshold: int = 0


@dataclass
class PruneReport(SizeReport):
    model_type: str
    qk_criterion: str | None
    vo_criterion: str | None
    allocation: str
    layers: list[LayerRanks]
    vo_whitening: str | None = None  # what whitened V-O (mixed+refit, mixed, input); auto reports its choice
    vo_whitening_losses: dict[str, float] = field(default_factory=dict)  # auto: held-out loss of each choice


def _current_rope_pairs(site: AttentionSite, groups: int, qk_dim: int) -> list[list[int]]:
    channels = getattr(site.module, "rope_channels", None)
    if channels is None:
        return [list(range(qk_dim // 2)) for _ in range(groups)]
    return [row[: qk_dim // 2] for row in channels]


def validate(config: PruneConfig, adapter: Adapter, sites: list[AttentionSite]) -> None:
    if config.vo_whitening not in VO_WHITENINGS:
        raise CloverError(f"unknown V-O whitening {config.vo_whitening!r}: use {', '.join(VO_WHITENINGS)}")
    config.check()
    for kind in ("qk", "vo"):
        crit = config.pair_criterion(kind)
        if crit not in CRITERIA:
            raise CloverError(f"unknown criterion {crit!r}: use one of {', '.join(CRITERIA)}")
        thresholds = [config.threshold_for(kind, s) for s in (config.stacks or {None: None})]
        if any(t is not None for t in thresholds) and (crit == "vanilla" or crit in ROTARY_CRITERIA):
            raise CloverError(f"a singular-value threshold needs the clover or whitened criterion, not {crit!r}")
    if adapter.uniform_head_dims and config.allocation == "global":
        raise CloverError(f"--allocation global gives layers different head dims, but {adapter.name} configs hold one "
                          "head dim for all layers: use --allocation uniform (a threshold works too: every layer "
                          "keeps the largest rank any layer needs)")
    if config.stacks is not None:
        have = list(dict.fromkeys(site.stack for site in sites if site.stack))
        unknown = [name for name in config.stacks if name not in have]
        if unknown:
            raise CloverError(f"--stack {unknown[0]}: this {adapter.name} model has "
                              + (f"the stacks {', '.join(have)}" if have else "one attention stack (use "
                                 "--qk-ratio / --vo-ratio)"))
    if not adapter.prunes_cross_attention and any(site.role == "cross" for site in sites) and \
            (config.stacks is None or "cross" in config.stacks):
        raise CloverError("pruning cross-attention blocks is not supported for this family yet: "
                          "orthogonalize works, or prune a model without cross-attention")


def check_runtime(model: nn.Module) -> None:
    """The family's pruned runtime can hold this model (its head; LLaMA-family settings such as a sliding window):
    checked before calibration, not found out when the pruned model is built."""
    config = getattr(model, "config", None)
    base = getattr(config, "model_type", None)
    if base is None or base.removeprefix("clover_") not in modeling.FAMILIES:
        return
    modeling.check_head(base, type(model).__name__, modeling.task_of(model))
    module = modeling.family_module(base)
    if hasattr(module, "llama_settings"):
        try:
            module.llama_settings(config)
        except ValueError as error:
            raise CloverError(f"cannot prune this {base} model: {error}") from None


def prune(model: nn.Module, config: PruneConfig) -> tuple[nn.Module, PruneReport]:
    """Return ``(pruned_model, report)``; ``model`` itself is not modified."""
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    validate(config, adapter, sites)
    config.check_against(model.config)
    check_runtime(model)
    if choosing_vo_whitening(config):
        return _prune_choosing_vo_whitening(model, config)
    return _prune(model, replace(config, vo_whitening=_fixed_whitening(config)))


def choosing_vo_whitening(config: PruneConfig) -> bool:
    return config.vo_whitening == "auto" and config.active("vo") and config.pair_criterion("vo") == "whitened"


def _fixed_whitening(config: PruneConfig) -> str:
    """``auto`` where nothing is chosen (no whitened V-O, or too few windows to hold some out) means mixed."""
    return "mixed" if config.vo_whitening == "auto" else config.vo_whitening


def _prune_choosing_vo_whitening(model: nn.Module, config: PruneConfig) -> tuple[nn.Module, PruneReport]:
    """``vo_whitening="auto"``: prune once per choice from the first windows and score each on the last
    ``holdout`` windows (``heldout.fidelity_loss``: how far the outputs move from the original's); then prune with
    the winner from all windows, so the result is exactly that choice's prune at the calibration given."""
    batches = config.calibration
    if batches is None or len(batches) <= config.holdout:
        pruned, report = _prune(model, replace(config, vo_whitening="mixed"))
        report.notes.append(f"--vo-whitening auto holds out the last {config.holdout} calibration windows to choose "
                            f"and got {0 if batches is None else len(batches)}: used mixed (pass more "
                            "--calib-samples to choose from data)")
        return pruned, report
    held, statistics = batches[len(batches) - config.holdout:], batches[: len(batches) - config.holdout]
    reference = heldout.Reference(model, adapter_for(model), held)
    shared = None
    if not config.sequential:  # one calibration pass serves every choice (mixed needs the head outputs too)
        adapter = adapter_for(model)
        sites = adapter.sites(model)
        needs = statistics_needed(replace(config, vo_whitening="mixed", calibration=statistics))
        shared = calibrate.collect(model, adapter, sites, statistics, **needs, progress=config.progress)
    losses, settings = {}, {}
    for whitening, refit in VO_WHITENING_CHOICES:
        name = whitening + ("+refit" if refit else "")
        settings[name] = {"vo_whitening": whitening, "vo_refit": refit}
        trial, _ = _prune(model, replace(config, calibration=statistics, **settings[name]), shared)
        losses[name] = reference.loss(trial)
        del trial
    name = min(losses, key=losses.get)
    pruned, report = _prune(model, replace(config, **settings[name]))
    report.vo_whitening_losses = losses
    report.notes.append(f"--vo-whitening auto chose {name}: held-out {reference.metric} on the last "
                        f"{config.holdout} calibration windows " + ", ".join(f"{k} {v:.4g}" for k, v in losses.items()))
    return pruned, report


def _prune(model: nn.Module, config: PruneConfig, shared_stats=None) -> tuple[nn.Module, PruneReport]:
    """One prune with a fixed V-O whitening; ``shared_stats``: calibration statistics already gathered."""
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    kinds = active_kinds(config)
    collected: list[str] = []

    def warn(message: str) -> None:
        collected.append(message)
        warnings.warn(message, stacklevel=2)

    targets = {kind: [s for s in _targets(sites, kind, config.pair_criterion(kind), warn)
                      if config.stacks is None or config.active_in(kind, s.stack)] for kind in kinds}
    needs = statistics_needed(config)
    weights = {site.name: adapter.read(site) for site in sites}
    for site in sites:
        check_finite(weights[site.name], site)
    if config.sequential and not needs:
        warn("sequential calibration has no effect here: no data-aware criterion (whitened, rotary-activation) "
             "is in use")
    if config.sequential and needs:
        candidates, keeps = sequential.plan(
            model, adapter, sites, config, targets, weights, needs,
            lambda site, w, kind, st: pair_candidate(config, site, w, kind, st, warn))
        tokens = config.calibration.numel()
    else:
        candidates, keeps, tokens = _plan_one_shot(model, adapter, sites, config, targets, weights, needs, warn,
                                                   shared_stats)
    for kind in kinds:  # what the family's runtime can hold (e.g. one head dim for all layers)
        keeps[kind], why = adapter.adjust_ranks(kind, keeps[kind], candidates[kind][0].units)
        if why:
            warn(f"{kind} ranks raised to {keeps[kind]}: {why}")

    chosen = {(kind, site.name): (c, keep) for kind in kinds
              for site, c, keep in zip(targets[kind], candidates[kind], keeps[kind], strict=True)}
    new_weights, layers, intended = {}, [], {}
    for site in sites:
        mine = {kind: chosen[kind, site.name] for kind in kinds if (kind, site.name) in chosen}
        new_weights[site.name], layer, intended[site.name] = prune_block(
            site, weights[site.name], {k: c for k, (c, _) in mine.items()}, {k: keep for k, (_, keep) in mine.items()})
        count_below_threshold(config, layer, mine)
        layers.append(layer)

    pruned = build_pruned(model, layers)
    new_adapter = adapter_for(pruned)
    for site in new_adapter.sites(pruned):
        new_adapter.write(site, new_weights[site.name])
    for site in new_adapter.sites(pruned):
        check_block(new_adapter, site, intended[site.name])

    report = make_report(config, model_type(model), layers, parameter_count(model), parameter_count(pruned),
                         kv_bytes_per_token(model), kv_bytes_per_token(pruned),
                         tokens, collected, notes=report_notes(adapter, sites))
    return pruned, report


def _plan_one_shot(model, adapter, sites, config, targets, weights, needs, warn, shared_stats=None):
    """Statistics of the original model for every layer at once, then one candidate per (kind, site) and the
    ranks (the global allocation needs all of a kind at once)."""
    stats = shared_stats
    if needs and stats is None:
        stats = calibrate.collect(model, adapter, sites, config.calibration, **needs, progress=config.progress)
    candidates: dict[PairKind, list[Candidate]] = {}
    for kind, chosen in targets.items():
        crit = config.pair_criterion(kind)
        candidates[kind] = [
            pair_candidate(config, site, weights[site.name], kind, None if stats is None else stats.sites[site.name],
                           warn)
            for site in tqdm(chosen, desc=f"rank {kind} ({crit})", unit="block", disable=not config.progress)
        ]
    keeps = {kind: _keeps(config, kind, chosen, candidates[kind]) for kind, chosen in targets.items()}
    return candidates, keeps, 0 if stats is None else stats.tokens


def _keeps(config: PruneConfig, kind: PairKind, sites: list[AttentionSite], candidates: list[Candidate]
           ) -> list[int]:
    """Ranks for one pair: one allocation over all sites, or one per named stack with that stack's amounts."""
    groups = {None: list(range(len(sites)))} if config.stacks is None else {
        stack: [i for i, s in enumerate(sites) if s.stack == stack] for stack in config.stacks}
    keeps: list[int] = [0] * len(sites)
    for stack, index in groups.items():
        if not index:
            continue
        flag = f"--{kind}-ratio" if stack is None else f"--stack {stack}:{kind}-ratio"
        chosen = choose([candidates[i] for i in index], ratio=config.ratio_for(kind, stack),
                        threshold=config.threshold_for(kind, stack), allocation=config.allocation, what=flag,
                        names=[sites[i].name for i in index])
        for i, keep in zip(index, chosen, strict=True):
            keeps[i] = keep
    return keeps


def report_notes(adapter: Adapter, sites: list[AttentionSite]) -> list[str]:
    """What every report of this model should say besides the criterion's own notes."""
    notes = list(adapter.prune_notes)
    if any(site.role == "cross" for site in sites):
        notes.append("KV-cache bytes / token count self-attention K/V cached per generated token; "
                     "cross-attention K/V are cached once per encoder position and not included")
    return notes


def active_kinds(config: PruneConfig) -> list[PairKind]:
    return [k for k in ("qk", "vo") if config.active(k)]


def statistics_needed(config: PruneConfig) -> dict[str, bool]:
    """Which calibration statistics the chosen criteria read (``calibrate.attach`` flags); empty if none.

    Raises when a data-aware criterion has no calibration tokens, before any work is done.
    """
    needs = {config.pair_criterion(k) for k in active_kinds(config)} & set(DATA_AWARE)
    if not needs:
        return {}
    if config.calibration is None:
        raise CloverError(f"criterion {sorted(needs)[0]!r} needs calibration data: pass --calib PATH "
                          "(or set CLOVER_DATA)")
    return {"inputs": "whitened" in needs, "head_outputs": "whitened" in needs and config.vo_whitening == "mixed",
            "channels": "rotary-activation" in needs}


def pair_candidate(config: PruneConfig, site: AttentionSite, weights: AttentionWeights, kind: PairKind,
                   stats: SiteStats | None, warn) -> Candidate:
    """One block's candidate for one pair, exactly as the configuration asks (shared with clover.streaming)."""
    return candidate(weights, kind, config.pair_criterion(kind), rotary=site.rotary, name=f"{site.name} {kind}",
                     stats=stats, compute_dtype=config.compute_dtype, warn=warn, vo_whitening=config.vo_whitening,
                     vo_refit=config.vo_refit)


def prune_block(site: AttentionSite, w: AttentionWeights, candidates: dict[PairKind, Candidate],
                keeps: dict[PairKind, int]) -> tuple[AttentionWeights, LayerRanks, dict]:
    """Truncate one block's pairs to ``keeps``: new weights (in ``w``'s dtype), its ranks, and the intended
    factors ``{kind: (left, right)}`` whose product the written weights must reproduce."""
    new = w
    rope_pairs = None
    intended = {}
    for kind, c in candidates.items():
        left, right = c.truncate(keeps[kind])
        new = with_factors(new, kind, left, right)
        intended[kind] = (left, right)
        if c.order is not None:
            current = _current_rope_pairs(site, w.num_kv_heads, w.qk_dim)
            kept = c.order[:, : keeps[kind]].sort(dim=-1).values
            rope_pairs = [[current[g][p] for p in kept[g].tolist()] for g in range(w.num_kv_heads)]
    if rope_pairs is None and site.rotary and getattr(site.module, "rope_channels", None) is not None:
        rope_pairs = _current_rope_pairs(site, w.num_kv_heads, w.qk_dim)
    layer = LayerRanks(site.name, site.layer, new.qk_dim, new.vo_dim, w.qk_dim, w.vo_dim, rope_pairs, site.stack)
    return cast_like(new, w), layer, intended


def count_below_threshold(config: PruneConfig, layer: LayerRanks, chosen: dict) -> None:
    """Record on ``layer`` the directions a threshold kept below itself (``chosen``: kind -> (candidate, keep))."""
    for kind, (pair, keep) in chosen.items():
        threshold = config.threshold_for(kind, layer.stack or None)
        if threshold is not None:
            setattr(layer, f"{kind}_below_threshold", kept_below_threshold(pair, keep, threshold))


def threshold_notes(layers: list[LayerRanks]) -> list[str]:
    notes = []
    for kind, name in (("qk", "Q-K"), ("vo", "V-O")):
        key = f"{kind}_below_threshold"
        counts = [lr.get(key, 0) if isinstance(lr, dict) else getattr(lr, key) for lr in layers]  # streaming: dicts
        if any(counts):
            notes.append(f"--{kind}-threshold: {sum(counts)} {name} directions at or below the threshold stayed, in "
                         f"{sum(c > 0 for c in counts)} of {len(layers)} blocks (a block keeps one width for all its "
                         f"heads, its widest head's; per block: {kind}_below_threshold in the JSON)")
    return notes


def make_report(config: PruneConfig, model_type: str, layers: list[LayerRanks], params_before: int,
                params_after: int, kv_before: int, kv_after: int, tokens: int, warnings_: list[str],
                notes: list[str] = ()) -> PruneReport:
    kinds = active_kinds(config)
    report = PruneReport(
        model_type,
        config.pair_criterion("qk") if "qk" in kinds else None,
        config.pair_criterion("vo") if "vo" in kinds else None,
        "threshold" if config.qk_threshold is not None or config.vo_threshold is not None else config.allocation,
        layers, params_before=params_before, params_after=params_after, kv_bytes_per_token_before=kv_before,
        kv_bytes_per_token_after=kv_after, calibration_tokens=tokens, warnings=list(warnings_),
    )
    report.notes.extend(notes)
    report.notes.extend(threshold_notes(layers))
    if "vo" in kinds and config.pair_criterion("vo") == "whitened":
        report.vo_whitening = config.vo_whitening + ("+refit" if config.vo_whitening == "mixed" and config.vo_refit
                                                     else "")
    if "qk" in kinds and config.pair_criterion("qk") in ROTARY_CRITERIA:
        report.notes.append("Q-K was pruned by whole rotary frequency pairs: not a CLOVER rewrite "
                            "(rotary embeddings make every change of basis inexact there)")
    return report


def _targets(sites: list[AttentionSite], kind: PairKind, criterion: str, warn) -> list[AttentionSite]:
    """The blocks ``criterion`` prunes for this pair. A model may mix plain, rotary and normed Q-K (Mllama): Q-K
    pruning then touches only the blocks its criterion fits and the rest keep their width, with a warning. When it
    fits none, every block goes on to ``candidate``, which explains which criterion would."""
    if kind == "vo":
        return sites
    fits = [s for s in sites if not s.qk_inexact and (criterion in ROTARY_CRITERIA) == s.rotary]
    rewritable = [s for s in sites if not s.qk_inexact]
    if not rewritable:
        raise CloverError(f"Q-K cannot be pruned in this model: {sites[0].qk_inexact}; prune V-O only")
    if not fits:
        return rewritable
    for reason in dict.fromkeys(_qk_kept_reason(s, criterion) for s in sites if s not in fits):
        kept = [s.name for s in sites if s not in fits and _qk_kept_reason(s, criterion) == reason]
        warn(f"Q-K of {len(kept)} block(s) kept at full width ({kept[0]}, ...): {reason}")
    return fits


def _qk_kept_reason(site: AttentionSite, criterion: str) -> str:
    if site.qk_inexact:
        return site.qk_inexact
    if site.rotary:
        return f"criterion {criterion!r} cannot prune Q-K under rotary embeddings (use rotary-weight or " \
               "rotary-activation there)"
    return f"criterion {criterion!r} is for rotary Q-K only (use clover, whitened or vanilla there)"


def build_pruned(model: nn.Module, layers: list[LayerRanks]) -> nn.Module:
    """A fresh ``clover_<family>`` model with per-layer dims, holding every non-attention weight of ``model``
    (or the family's own pruned runtime, where its adapter builds one)."""
    own = adapter_for(model).build_pruned(model, layers)
    if own is not None:
        return own
    module = modeling.family_module(model.config.model_type)
    task = modeling.task_of(model)
    config = pruned_config(model.config, layers, task, type(model).__name__)
    reference = next(model.parameters())
    pruned = module.CLASSES[task](config).to(device=reference.device, dtype=reference.dtype)
    own = pruned.state_dict()
    source = model.state_dict()
    unexpected = [k for k in source if k not in own]
    if unexpected:
        raise CloverError(f"internal: weights with no place in the pruned model: {unexpected[:3]}")
    copy_matching(pruned, source)  # everything but the resized attention weights, which the adapter writes next
    keep_buffer_dtypes(pruned, model)
    return pruned.eval()


def pruned_config(base, layers: list[LayerRanks], task: str, what: str):
    """The ``clover_<family>`` config for ``base`` with the per-layer dims (and kept rotary pairs) of ``layers``;
    ``task`` is a ``modeling`` CLASSES key and ``what`` names the model class in the error when it has none."""
    module = modeling.family_module(base.model_type)
    if task not in module.CLASSES:
        raise CloverError(f"pruning a {what} is not supported: load the model with a "
                          f"{' or '.join(k for k in module.CLASSES if k != 'config')} head")
    if hasattr(module, "pruned_config"):  # several attention stacks: the family maps site names to its dims
        config = module.pruned_config(base, layers)
    else:
        config = module.CLASSES["config"](**_pruned_settings(module, base, layers))
    config.architectures = [module.CLASSES[task].__name__]
    return config


def _pruned_settings(module, base, layers: list[LayerRanks]) -> dict:
    try:  # a family whose pruned runtime is another family's (Mistral, Qwen2 -> clover_llama) converts its config
        settings = module.llama_settings(base) if hasattr(module, "llama_settings") else base.to_dict()
    except ValueError as error:
        raise CloverError(f"cannot prune this {base.model_type} model: {error}") from None
    settings = {k: v for k, v in settings.items()
                if k not in DROPPED_SETTINGS}
    main = [lr for lr in layers if not lr.stack]
    if main:
        n = base.num_hidden_layers
        head_dim = main[0].qk_before if not hasattr(base, "head_dim") else base.head_dim
        qk = [None] * n
        vo = [None] * n
        rope = [None] * n
        for lr in main:
            qk[lr.layer], vo[lr.layer], rope[lr.layer] = lr.qk_dim, lr.vo_dim, lr.rope_pairs
        settings.update(qk_dims=[d if d is not None else head_dim for d in qk],
                        vo_dims=[d if d is not None else head_dim for d in vo])
        if "rope_pairs" in module.CLASSES["config"].__dataclass_fields__:
            settings["rope_pairs"] = rope
    for stack in dict.fromkeys(lr.stack for lr in layers if lr.stack):  # e.g. Whisper: encoder, decoder, cross
        by_layer = {lr.layer: lr for lr in layers if lr.stack == stack}
        if sorted(by_layer) != list(range(len(by_layer))):
            raise CloverError(f"internal: {stack} blocks found for layers {sorted(by_layer)}, not 0..n-1")
        settings[f"{stack}_qk_dims"] = [by_layer[i].qk_dim for i in range(len(by_layer))]
        settings[f"{stack}_vo_dims"] = [by_layer[i].vo_dim for i in range(len(by_layer))]
    return settings


def check_block(adapter: Adapter, site: AttentionSite, intended: dict) -> None:
    """The weights written into ``site`` must reproduce the products of the intended ``{kind: (left, right)}``.

    Products are compared on random probe vectors (``left (right^T X)``), never formed: a product is
    (heads x D) x D per group, gigabytes per layer for a 7B model, while any layout or truncation error still
    shows on the probes.
    """
    w = adapter.read(site)
    for kind, (want_left, want_right) in intended.items():
        left, right = factors(w, kind)
        probes = torch.randn(right.shape[-2], 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        got = left.double() @ (right.double().mT @ probes)
        want = want_left.double() @ (want_right.double().mT @ probes)
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
        tol = 1e-5 if w.q.weight.dtype == torch.float32 else 2e-2
        if err > tol:
            raise CloverError(f"internal: {site.name} {kind} written weights differ from the intended "
                              f"truncation by {err:.1e} (relative); nothing was saved")
