"""``to_mla``: a LLaMA-family model -> a stock DeepSeek-V3 (MLA) model with one latent rank, verified.

Flow: calibrate (attention-input moments on validation text) -> per layer, the rotary split and the joint latent
(``solve``) -> one ``kv_lora_rank`` from the KV budget -> the key/value split chosen on held-out windows (one for
every layer, then, with ``split="layer"``, each layer's own) -> the stock model (``deepseek``) -> optionally the
layer-wise refit of the attention blocks (``local``) and the stream refit of the projections that write into the
residual stream (``stream``) -> checked against clover's reference of the same function (``reference``).
"""

from __future__ import annotations

import copy
from statistics import median
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import calibrate, heldout
from ..adapters import adapter_for
from ..calibrate import cholesky_factor
from ..errors import CloverError
from ..pairs import check_finite
from ..sizes import SizeReport, parameter_count
from ..verify import TOLERANCE, compare, model_outputs
from . import attention, deepseek, gqa, local, stream
from .config import SPLIT_SEARCHES, MlaConfig
from .local import LocalFit
from .stream import StreamFit
from .reference import reference_model
from .solve import LayerMla, LayerParts, RotarySettings, full_rank, latent_layer, nope_dims, split_layer


HELD_OUT_USES = "the key/value split or whether a refit is kept"
FIXED = "a fixed --split, no --local-steps and no --stream-refit"


@dataclass
class MlaLayer:
    layer: int
    rope_energy: float  # query-weighted share of the key energy in the shared rotated key
    latent_energy: float  # weighted share of the joint latent kept at kv_lora_rank
    split: float | None = None  # the key/value split this layer's latent was solved with
    local: LocalFit | None = None  # the layer-wise refit's held-out error before / after (``local.py``)
    stream: dict[str, StreamFit] = field(default_factory=dict)  # the stream refit's, per projection


@dataclass
class MlaReport(SizeReport):
    model_type: str
    target: str  # the stock class the output is
    layout: str  # mla (DeepSeek-V3, latent cache) or gqa (plain llama, fewer KV heads)
    kv_heads: int  # KV heads of the output (1 for MLA: one latent and one rotated key)
    kv_ratio: float
    kv_lora_rank: int
    full_rank: int  # latent dims that keep every unrotated key component and value
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    split: float | None  # the one split every layer was solved with (with split="layer", where each layer started)
    split_losses: dict[str, float] = field(default_factory=dict)  # held-out loss per grid split; "layer": per layer
    rope_key: str | None = None  # the rotary levers used (MlaConfig)
    unrotated: str | None = None
    latent_weights: str | None = None
    value_moment: str | None = None
    rope_frequencies: list[int] | None = None  # the original frequencies the shared key turns by (MLA layout)
    rope_theta: float | None = None  # the output's rope theta: the one under which its rope dims turn by those
    layers: list[MlaLayer] = field(default_factory=list)
    check: dict | None = None  # the stock model against clover's reference of the converted function


def check_model(model: nn.Module, config: MlaConfig) -> int:
    """The loaded model against the format (a config that said nothing wrong can still hold biases)."""
    rank = config.check_against(model.config)
    adapter = adapter_for(model)
    if adapter.name != "llama" or not hasattr(model, "model"):
        raise CloverError(f"MLA conversion needs a LLaMA-family causal LM, not {type(model).__name__}: load it with "
                          "AutoModelForCausalLM")
    for site in adapter.sites(model):
        w = adapter.read(site)
        if any(p.bias is not None for p in (w.q, w.k, w.v, w.o)):
            raise CloverError(f"{site.name} has attention biases, which the MLA format has no place for: use a model "
                              "without them")
    return rank


def to_mla(model: nn.Module, config: MlaConfig) -> tuple[nn.Module, MlaReport]:
    """Return ``(DeepseekV3ForCausalLM, report)``; ``model`` itself is not modified."""
    config.check()
    rank = check_model(model, config)
    if config.calibration is None:
        raise CloverError("MLA conversion is data-aware: pass calibration token ids (--calib PATH or CLOVER_DATA)")
    if config.layout == "gqa":
        return _to_gqa(model, config)
    searching = config.searches_split()
    held, statistics = heldout.split_windows(config.calibration, config.holdout, config.holds_out(),
                                             model.config.hidden_size, what=HELD_OUT_USES, fixed=FIXED)
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    stats = calibrate.collect(model, adapter, sites, statistics, inputs=True, progress=config.progress)
    inv_freq = rotary_frequencies(model)
    seen = attention.collect(model, adapter, sites, statistics, inv_freq, config.refit_windows, config.progress,
                             mixed=config.mixes_values()) if config.needs_attention() else [None] * len(sites)
    settings = RotarySettings(**{f.name: getattr(config, f.name) for f in fields(RotarySettings)})
    parts = [_layer_parts(adapter, site, stats.sites[site.name].q_input, config.compute_dtype, settings, layer_seen,
                          inv_freq)
             for site, layer_seen in tqdm(list(zip(sites, seen, strict=True)), desc="rotary split", unit="layer",
                                          disable=not config.progress)]
    del seen
    w0 = adapter.read(sites[0])
    kv_heads, head_dim = w0.num_kv_heads, w0.qk_dim
    rope_dims = config.rope_dims or head_dim

    losses: dict[str, float] = {}
    split = float(config.split) if config.split not in SPLIT_SEARCHES else None
    if split is None and searching:
        reference = heldout.Reference(model, adapter, held)
        for candidate in config.split_grid:
            trial = deepseek.build(model, [latent_layer(p, rank, candidate) for p in parts], rank, head_dim)
            losses[f"{candidate:g}"] = reference.loss(trial)
            del trial
        split = float(min(losses, key=losses.get))
    elif split is None:
        split = float(config.split_grid[0])
    layers = [latent_layer(p, rank, split) for p in parts]
    layer_splits = [split] * len(layers)
    mla = deepseek.build(model, layers, rank, head_dim)
    if config.splits_per_layer():
        layer_splits, losses["layer"] = split_per_layer(model, mla, parts, layers, layer_splits, rank, head_dim,
                                                        config, reference, losses[f"{split:g}"])
    fits = []
    if config.local_steps:
        layers, fits = local.refit(model, adapter, sites, layers, statistics, held, head_dim, config.local_steps,
                                   config.local_lr, config.local_batch, config.local_inputs, config.progress)
        for block, original, layer, fit in zip(mla.model.layers, model.model.layers, layers, fits, strict=True):
            if fit.kept:  # a block whose refit was not kept holds its solved maps already
                deepseek.write_layer(block.self_attn, original, layer, head_dim)
    weights, stream_fits = stream.refit(model, mla, statistics, held, config.stream_refit,
                                        progress=config.progress) if config.stream_refit else \
        ([{}] * len(layers), [{}] * len(layers))
    layers = [replace(layer, o=new["o"].to(layer.o.dtype)) if "o" in new else layer
              for layer, new in zip(layers, weights, strict=True)]
    deepseek.balance_pairs(mla)
    check = verify(model, mla, layers, head_dim, adapter, [new.get("down") for new in weights])
    size = next(model.parameters()).element_size()
    report = MlaReport(
        model_type=model.config.model_type, target="DeepseekV3ForCausalLM", layout="mla", kv_heads=1,
        kv_ratio=config.kv_ratio,
        kv_lora_rank=rank, full_rank=full_rank(kv_heads, head_dim, rope_dims),
        qk_nope_head_dim=nope_dims(kv_heads, head_dim, rope_dims), qk_rope_head_dim=rope_dims, split=split,
        split_losses=losses, rope_key=config.rope_key, unrotated=config.unrotated,
        latent_weights=config.latent_weights, value_moment=config.value_moment,
        rope_frequencies=layers[0].rope_freqs.tolist(),
        rope_theta=float(mla.config.rope_parameters["rope_theta"]),
        layers=[MlaLayer(site.layer, lr.rope_energy, lr.kept_energy, s, fit, stream_fit)
                for site, lr, s, fit, stream_fit in zip(sites, layers, layer_splits, fits or [None] * len(layers),
                                                        stream_fits, strict=True)],
        check=check, params_before=parameter_count(model), params_after=parameter_count(mla),
        kv_bytes_per_token_before=len(sites) * 2 * kv_heads * head_dim * size,
        kv_bytes_per_token_after=len(sites) * (rank + rope_dims) * size, calibration_tokens=stats.tokens,
    )
    if fits:
        reads = {"residual": "converted model's attention inputs, toward the original residual stream"}.get(
            config.local_inputs, f"{config.local_inputs} model's attention inputs")
        report.notes.append(f"layer-wise refit ({config.local_steps} steps a block, on the {reads}): "
                            f"{kept_summary(fits, 'block', 'block output error')}")
    for projection in config.stream_refit:
        summary = kept_summary([f[projection] for f in stream_fits], "layer",
                               f"stream error where {projection}_proj writes")
        report.notes.append(f"stream refit of {projection}_proj (solved toward the original residual stream, on the "
                            f"converted model's): {summary}")
    if rank > report.full_rank:
        report.notes.append(f"kv_lora_rank {rank} is above the {report.full_rank} dims a layer has: the extra latent "
                            "dims are zero (kept for the engine's size rule)")
    if kv_heads > 1 or rope_dims < head_dim:
        report.notes.append(f"{report.qk_nope_head_dim} of the {kv_heads * head_dim} key dims have no rotated place "
                            f"in the format and attend without rotation ({config.unrotated}); this is the "
                            "conversion's error at full rank (see rope_energy per layer: the share the shared "
                            "rotated key keeps)")
    report.warn_if_larger()
    return mla, report


def kept_summary(fits: list[LocalFit | StreamFit], unit: str, measured: str) -> str:
    """A refit's report line: how many ``unit``s (blocks, layers) kept it, and the held-out error it is judged by
    (``measured``: a block's output, the stream at a projection's write point), median over them, before and after
    (a refit not kept leaves its ``before``)."""
    kept = sum(fit.kept for fit in fits)
    return (f"kept in {kept} of {len(fits)} {unit}s; held-out {measured}, median over {unit}s, "
            f"{median(f.before for f in fits):.4f} -> {median(min(f.before, f.after) for f in fits):.4f}")


def split_per_layer(model: nn.Module, mla: nn.Module, parts: list[LayerParts], layers: list[LayerMla],
                    splits: list[float], rank: int, head_dim: int, config: MlaConfig, reference: heldout.Reference,
                    loss: float) -> tuple[list[float], float]:
    """One pass over the layers, first to last: each tries every other split of the grid with the rest of the model
    as chosen so far, and keeps the one whose held-out loss is lowest. ``mla``, ``layers`` and ``splits`` (all
    layers at the one best split, whose loss is ``loss``) are updated in place; returns ``(splits, final loss)``.
    Rewriting one layer of the built model (``deepseek.write_layer``) makes a trial one held-out pass, and that pass
    starts at the layer rewritten (``heldout.FromLayer``: the layers before it are settled, and each settled layer
    but the last runs once more, to give the next layer its inputs)."""
    blocks = list(zip(mla.model.layers, model.model.layers, strict=True))
    steps = tqdm(range(len(layers)), desc="per-layer split", unit="layer", disable=not config.progress)
    tail = heldout.FromLayer(reference, mla, 0)
    for i in steps:
        (block, original), kept = blocks[i], splits[i]
        for candidate in config.split_grid:
            if float(candidate) == splits[i]:
                continue
            trial = latent_layer(parts[i], rank, float(candidate))
            deepseek.write_layer(block.self_attn, original, trial, head_dim)
            trial_loss = tail.loss()
            if trial_loss < loss:
                loss, kept, layers[i] = trial_loss, float(candidate), trial
        splits[i] = kept
        deepseek.write_layer(block.self_attn, original, layers[i], head_dim)
        if i + 1 < len(layers):  # the last layer has no later one to give inputs to
            tail.advance()
    return splits, loss


def _to_gqa(model: nn.Module, config: MlaConfig) -> tuple[nn.Module, MlaReport]:
    """``layout="gqa"``: the plain llama architecture with ``config.kv_heads`` KV heads (``gqa.py``)."""
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    heldout.split_windows(config.calibration, 0, False, model.config.hidden_size)
    stats = calibrate.collect(model, adapter, sites, config.calibration, inputs=True, progress=config.progress)
    layers = []
    for site in tqdm(sites, desc="fewer KV heads", unit="layer", disable=not config.progress):
        w = adapter.read(site)
        check_finite(w, site)
        cov = stats.sites[site.name].q_input[:-1, :-1].to(config.compute_dtype)
        chol = cholesky_factor(cov, name=f"layer {site.layer} attention input")
        dtype = config.compute_dtype
        layers.append(gqa.gqa_layer(w.q.weight.to(dtype).T, w.k.weight.to(dtype).T, w.v.weight.to(dtype).T,
                                    w.o.weight.to(dtype), cov, chol, w.num_heads, w.num_kv_heads, w.qk_dim,
                                    config.kv_heads))
    rewritten = gqa.build(model, layers, config.kv_heads)
    w0 = adapter.read(sites[0])
    size = next(model.parameters()).element_size()
    report = MlaReport(
        model_type=model.config.model_type, target=type(rewritten).__name__, layout="gqa", kv_heads=config.kv_heads,
        kv_ratio=1 - config.kv_heads / w0.num_kv_heads, kv_lora_rank=0, full_rank=0, qk_nope_head_dim=0,
        qk_rope_head_dim=w0.qk_dim, split=None,
        layers=[MlaLayer(site.layer, lr["rope_energy"], lr["latent_energy"]) for site, lr in zip(sites, layers,
                                                                                                  strict=True)],
        check=None, params_before=parameter_count(model), params_after=parameter_count(rewritten),
        kv_bytes_per_token_before=len(sites) * 2 * w0.num_kv_heads * w0.qk_dim * size,
        kv_bytes_per_token_after=len(sites) * 2 * config.kv_heads * w0.qk_dim * size, calibration_tokens=stats.tokens,
    )
    per = w0.num_kv_heads // config.kv_heads
    if per > 1:
        report.notes.append(f"each KV head serves {per} of the original's; of every frequency's {per} rotary key "
                            "components it keeps the strongest and drops the rest (the plain llama layout has no "
                            "place for unrotated keys); its value is a rank-head_dim latent of theirs")
    return rewritten, report


ROUNDING_FACTOR = 4  # how much further than clover's own float32 reference the stock model may be from the exact one


def rounding_check(model: nn.Module, mla: nn.Module, layers, head_dim: int, inputs: dict, expected: torch.Tensor,
                   result: dict, mlp_down=None) -> dict:
    """The float32 check's second chance. A conversion that removes much (no rotation kept at KV 25%, say) can be an
    ill-conditioned function whose float32 rounding alone moves the logits past 1e-4 on some CPUs, whoever computes
    it. Both float32 models are then measured against the exact function (clover's reference in float64, from the
    float64 solve): the stock model passes if it is no further from it than ``ROUNDING_FACTOR`` times clover's own
    float32 reference is. A wrong weight moves it by far more than rounding does."""
    exact_twin = reference_model(model, layers, head_dim, torch.float64, mlp_down)
    exact = model_outputs(exact_twin, inputs)
    del exact_twin
    own = (expected - exact).abs().max().item() / (exact.abs().max().item() or 1.0)
    stock = compare(exact, mla, inputs).relative_diff  # the same scale: the exact function's largest logit
    if stock > max(ROUNDING_FACTOR * own, result["tolerance"]):
        raise CloverError(f"internal: the DeepSeek-V3 model differs from the converted function by "
                          f"{result['relative_diff']:.1e} (relative; tolerance {result['tolerance']:.0e}), and from "
                          f"its float64 reference by {stock:.1e}, more than {ROUNDING_FACTOR}x the {own:.1e} of "
                          "clover's own float32 reference")
    return {**result, "passed": True, "float64_reference": {"stock_relative_diff": stock,
                                                             "float32_reference_relative_diff": own,
                                                             "factor": ROUNDING_FACTOR}}


def rotary_frequencies(model: nn.Module) -> torch.Tensor:
    """The original model's RoPE frequencies (theta_f per complex channel), read from its rotary embedding."""
    return model.model.rotary_emb.inv_freq.detach().double().cpu()


def _layer_parts(adapter, site, moment: torch.Tensor, dtype: torch.dtype, settings: RotarySettings | None = None,
                 seen=None, inv_freq: torch.Tensor | None = None) -> LayerParts:
    w = adapter.read(site)
    check_finite(w, site)
    cov = moment[:-1, :-1].to(dtype)  # no biases: the homogeneous coordinate carries nothing
    chol = cholesky_factor(cov, name=f"layer {site.layer} attention input")
    return split_layer(w.q.weight.to(dtype).T, w.k.weight.to(dtype).T, w.v.weight.to(dtype).T,
                       w.o.weight.to(dtype), cov, w.num_heads, w.num_kv_heads, w.qk_dim, chol, settings, seen,
                       inv_freq)


def verify(model: nn.Module, mla: nn.Module, layers, head_dim: int, adapter, mlp_down=None) -> dict:
    """The stock model must compute clover's reference of the converted function (relative to the logit scale);
    ``mlp_down``: the stream refit's down projections (``stream.refit``), which the reference takes from there
    (its O projections are in ``layers``)."""
    inputs = {**adapter.example_inputs(model), "use_cache": False}
    twin = reference_model(model, layers, head_dim, mlp_down=mlp_down)
    expected = model_outputs(twin, inputs)
    del twin
    check = compare(expected, mla, inputs)
    dtype = next(model.parameters()).dtype
    result = check.to_dict()
    if not check.passed and dtype == torch.float32:
        result = rounding_check(model, mla, layers, head_dim, inputs, expected, result, mlp_down)
    elif not check.passed:
        raise CloverError(f"internal: the DeepSeek-V3 model differs from the converted function by "
                          f"{check.relative_diff:.1e} (relative; tolerance {TOLERANCE.get(dtype, 1e-4):.0e})")
    if dtype == torch.float32:  # what serving in bfloat16 costs, next to the float32 proof
        half = copy.deepcopy(mla).to(torch.bfloat16)
        got = model_outputs(half, inputs).float()
        result["bf16_relative_diff"] = float((got - expected).abs().max() / expected.abs().max())
        del half
    result["rope_layout"] = "interleaved"
    result["latent_norm_margin"] = deepseek.NORM_MARGIN
    return result
