"""``stream_orthogonalize`` and ``stream_prune``: the in-memory verbs, one decoder layer at a time.

A layer is loaded from the safetensors shards into the meta-device skeleton, rewritten by the same functions the
in-memory path calls (``orthogonalize_site``; ``pair_candidate`` -> ``choose`` -> ``prune_block``), checked
(``check_block``: the written weights must reproduce the intended products), written as its own shard and
released. Every other tensor (embeddings, final norm, head) is copied through untouched in groups no bigger
than a layer. So peak memory is about one layer (plus the calibration cache), whatever the model's size, and
the result equals the in-memory one: same weights, same math, same order of float operations.

Global allocation needs every layer's scores before any layer is cut: a first pass stores the (tiny) scores and
the layer's calibration statistics in the work folder, a second pass prunes. An interrupted run resumes from
the last finished layer of whichever pass it was in (see ``workdir``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from .. import modeling
from ..calibrate import SiteStats
from ..criteria import Candidate
from ..errors import CloverError
from ..orthogonalize import OrthogonalizeConfig, PairResult, check_config, orthogonalize_site
from ..prune import (
    LayerRanks,
    PruneConfig,
    PruneReport,
    active_kinds,
    check_block,
    check_runtime,
    choosing_vo_whitening,
    count_below_threshold,
    make_report,
    pair_candidate,
    prune_block,
    pruned_config,
    statistics_needed,
    validate,
)
from ..pairs import check_finite
from ..ranks import choose
from .calibration import LayerwiseCalibration
from .checkpoint import INDEX_FILE, SINGLE_FILE, open_checkpoint
from .skeleton import Block, blocks_of, empty_model, materialize, release
from .workdir import WorkDir, disk_errors

# Files of the source folder that a converted checkpoint must not inherit (weights, index, stale reports).
_NOT_COPIED = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")
_REPLACED = {"config.json", INDEX_FILE, SINGLE_FILE, "clover_report.json", "model.safetensors.index.json.tmp"}
REPORT_FILE = "clover_report.json"


@dataclass
class StreamOptions:
    """How to run a streaming conversion. ``dtype`` casts float tensors as they are read (as ``--dtype`` does
    when loading in memory); ``on_block_done(index)`` is called after each finished layer (progress hooks)."""

    dtype: torch.dtype | None = None
    overwrite: bool = False
    progress: bool = True
    on_block_done: Callable[[int], None] | None = None


def _config_of(folder: Path):
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as error:
        raise CloverError(f"{folder}/config.json names an architecture this transformers version does not know "
                          f"({str(error).splitlines()[0]}): upgrade transformers or use another model") from error
    except OSError as error:
        raise CloverError(f"{folder} has no readable config.json ({str(error).splitlines()[0]}): "
                          "pass a folder written by save_pretrained") from error


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Conversion:
    """What both verbs share: the checkpoint, the skeleton, the work folder, block and copy-through shards."""

    def __init__(self, source: str | os.PathLike, out: str | os.PathLike, command: str, settings: dict,
                 options: StreamOptions, calibration: torch.Tensor | None = None):
        self.source = Path(source)
        self.options = options
        self.checkpoint = open_checkpoint(self.source, options.dtype)
        self.config = _config_of(self.source)
        self.dtype = options.dtype or self.checkpoint.stored_dtype
        self.model = empty_model(self.config, self.dtype)
        self.adapter, self.blocks = blocks_of(self.model)
        for block in self.blocks:
            for site in block.sites:
                names = self.adapter.tensor_names(site)
                self.checkpoint.require(names, f"attention of {site.name}")
                self.checkpoint.require_float(names)
        fingerprint = {
            "command": command, "settings": settings, "dtype": str(self.dtype), "source": str(self.source.resolve()),
            "tensors": _digest({n: [i.shard, i.dtype, i.shape] for n, i in self.checkpoint.tensors.items()}),
            "shard_sizes": _digest({s: (self.source / s).stat().st_size
                                    for s in {i.shard for i in self.checkpoint.tensors.values()}}),
            "calibration": None if calibration is None else _digest(calibration.tolist()),
        }
        self.work = WorkDir(out, fingerprint, options.overwrite)

    def bar(self, items, desc: str, unit: str = "layer"):
        return tqdm(items, desc=desc, unit=unit, disable=not self.options.progress)

    def block_tensors(self, block: Block) -> list[str]:
        return [n for n in self.checkpoint.names if block.owns(n)]

    def write_block(self, block: Block, rewritten: dict[str, torch.Tensor]) -> dict:
        """The block's shard: its rewritten attention tensors plus every other tensor of the layer, as stored."""
        others = [n for n in self.block_tensors(block) if n not in rewritten]
        tensors = {**self.checkpoint.read(others), **rewritten}
        shard = f"block-{block.index:05d}.safetensors"
        self.work.write_tensors(shard, tensors)
        return {"shard": shard, "tensors": {n: t.nbytes for n, t in tensors.items()}}

    def copy_rest(self) -> None:
        """Copy tensors outside every layer in groups no bigger than the largest layer (or one tensor)."""
        rest = [n for n in self.checkpoint.names if not any(b.owns(n) for b in self.blocks)]
        limit = max(sum(self.checkpoint.output_bytes(n) for n in self.block_tensors(b)) for b in self.blocks)
        groups: list[list[str]] = []
        size = 0
        for name in rest:
            nbytes = self.checkpoint.output_bytes(name)
            if not groups or size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        done = self.work.done("rest")
        for i, group in enumerate(self.bar(groups, "copy other tensors", "shard")):
            if str(i) in done:
                continue
            tensors = self.checkpoint.read(group)
            shard = f"rest-{i:05d}.safetensors"
            self.work.write_tensors(shard, tensors)
            self.work.finish("rest", i, {"shard": shard, "tensors": {n: t.nbytes for n, t in tensors.items()}})
            del tensors

    def copy_side_files(self) -> None:
        """Tokenizer, generation config and the like: everything that is neither weights nor replaced."""
        with disk_errors(self.work.path, self.work.hint):
            for entry in sorted(self.source.iterdir()):
                if entry.is_file() and entry.name not in _REPLACED and not entry.name.endswith(_NOT_COPIED):
                    shutil.copyfile(entry, self.work.path / entry.name)

    def publish(self, report: dict) -> Path:
        records = [self.work.done("write")[str(b.index)] for b in self.blocks]
        records += [self.work.done("rest")[k] for k in sorted(self.work.done("rest"), key=int)]
        weight_map = {name: r["shard"] for r in records for name in r["tensors"]}
        total = sum(n for r in records for n in r["tensors"].values())
        self.copy_side_files()
        with disk_errors(self.work.path, self.work.hint):
            (self.work.path / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        keep = tuple(e.name for e in self.work.path.iterdir()
                     if e.is_file() and not e.name.startswith(("block-", "rest-", "hidden-", "stats-", "scores-"))
                     and e.name != "progress.json")
        return self.work.publish([r["shard"] for r in records], weight_map, total, keep)

    def block_done(self, block: Block) -> None:
        if self.options.on_block_done is not None:
            self.options.on_block_done(block.index)


def _site_state(site) -> dict[str, torch.Tensor]:
    return {f"{site.name}.{k}": v for k, v in site.module.state_dict().items()}


def stream_orthogonalize(source: str | os.PathLike, out: str | os.PathLike,
                         config: OrthogonalizeConfig | None = None,
                         options: StreamOptions | None = None) -> dict:
    """Orthogonalize a safetensors checkpoint folder into ``out`` layer by layer; returns the report (as saved).

    Each rewritten block is checked against the products of its original weights (the whole-model logit check
    of ``orthogonalize_`` would need the whole model in memory).
    """
    config = config or OrthogonalizeConfig()
    options = options or StreamOptions(progress=config.progress)
    check_config(config)
    settings = {"pairs": list(config.pairs), "compute_dtype": str(config.compute_dtype)}
    conv = _Conversion(source, out, "orthogonalize", settings, options)
    work, adapter = conv.work.open(), conv.adapter
    done = work.done("write")
    for block in conv.bar(conv.blocks, "orthogonalize"):
        if str(block.index) in done:
            continue
        results: list[PairResult] = []
        try:
            for site in block.sites:
                materialize(site.module, site.name, conv.checkpoint, f"attention of {site.name}")
            rewritten = {}
            for site in block.sites:
                site_results, products = orthogonalize_site(adapter, site, config)
                check_block(adapter, site, products)
                results += site_results
                rewritten.update(_site_state(site))
        finally:
            release(block.module)
        record = conv.write_block(block, rewritten)
        work.finish("write", block.index, {**record, "pairs": [asdict(r) for r in results]})
        conv.block_done(block)
    conv.copy_rest()

    conv.config.dtype = conv.dtype
    with disk_errors(work.path, work.hint):
        conv.config.save_pretrained(work.path)
    pairs = [p for b in conv.blocks for p in done[str(b.index)]["pairs"]]
    report = {"model": str(source), "model_type": conv.config.model_type, "adapter": adapter.name, "pairs": pairs,
              "check": {"kind": "per-block products", "passed": True}, "streamed": True}
    conv.publish(report)
    return report


class _Scores:
    """A candidate reduced to what ``ranks.choose`` reads (scores per group, best first)."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    @property
    def units(self) -> int:
        return self.scores.shape[-1]


def _stats_to_tensors(stats: dict[str, SiteStats]) -> dict[str, torch.Tensor]:
    out = {}
    for site, st in stats.items():
        for field_name in ("q_input", "kv_input", "head_output", "q_channel_sq", "k_channel_sq"):
            value = getattr(st, field_name)
            if value is not None and not (field_name == "kv_input" and value is st.q_input):  # self-attention
                out[f"{site}|{field_name}"] = value
    return out


def _stats_from_tensors(tensors: dict[str, torch.Tensor], sites: list[str]) -> dict[str, SiteStats]:
    stats = {site: SiteStats() for site in sites}
    for key, value in tensors.items():
        site, field_name = key.split("|")
        setattr(stats[site], field_name, value)
    for st in stats.values():
        if st.kv_input is None:
            st.kv_input = st.q_input
    return stats


def stream_prune(source: str | os.PathLike, out: str | os.PathLike, config: PruneConfig,
                 options: StreamOptions | None = None) -> PruneReport:
    """Prune a safetensors checkpoint folder into ``out`` (a ``clover_<family>`` checkpoint) layer by layer."""
    options = options or StreamOptions(progress=config.progress)
    would_choose = choosing_vo_whitening(config)
    config = replace(config, vo_whitening="mixed" if config.vo_whitening == "auto" else config.vo_whitening)
    kinds = active_kinds(config)
    needs = statistics_needed(config)
    if config.sequential and needs:
        raise CloverError("sequential calibration is not implemented for streamed pruning (it measures each layer "
                          "on the original model's states): drop --sequential, or pass --no-stream")
    settings = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(config).items()
                if k not in ("calibration", "progress")}
    conv = _Conversion(source, out, "prune", settings, options,
                       calibration=config.calibration if needs else None)
    adapter = conv.adapter
    if adapter.name != "llama":
        # Pruned weights are written into the stock module and read back by shape; the GPT-2 and BERT adapters
        # read fused projections by the module's head size, which only the clover_<family> module knows.
        raise CloverError(f"streamed pruning supports the LLaMA family, not {conv.config.model_type}: pass "
                          "--no-stream to prune in memory (streamed orthogonalize works for it)")
    sites = [s for b in conv.blocks for s in b.sites]
    validate(config, adapter, sites)
    check_runtime(conv.model)
    task = modeling.task_of(conv.model)
    if config.allocation not in ("uniform", "global"):
        raise CloverError(f"unknown allocation {config.allocation!r}: use uniform or global")
    pruned_config(conv.config, [LayerRanks(s.name, s.layer, 1, 1, 1, 1) for s in sites[:1]], task,
                  type(conv.model).__name__)  # fails now, not after the work, if the family cannot be pruned
    global_kinds = [k for k in kinds if config.allocation == "global" and config.threshold_for(k) is None]

    work = conv.work.open()
    collected: list[str] = []

    def warn(message: str) -> None:
        collected.append(message)
        warnings.warn(message, stacklevel=2)

    calib = None
    if needs:
        calib = LayerwiseCalibration(conv.model, adapter, conv.blocks, conv.checkpoint, config.calibration, needs,
                                     work, options.progress)

    def load_block(block: Block, cached_stats: bool) -> dict[str, SiteStats] | None:
        """Materialize the block's attention (the whole block when calibrating) and return its statistics."""
        if needs and not cached_stats:
            return calib.stats(block)
        for site in block.sites:
            materialize(site.module, site.name, conv.checkpoint, f"attention of {site.name}")
        if needs:
            return _stats_from_tensors(work.read_tensors(f"stats-{block.index:05d}.safetensors"),
                                       [s.name for s in block.sites])
        return None

    def candidates_of(block: Block, stats) -> dict[str, dict[str, Candidate]]:
        out = {}
        for site in block.sites:
            weights = adapter.read(site)
            check_finite(weights, site)
            out[site.name] = {kind: pair_candidate(config, site, weights, kind,
                                                   None if stats is None else stats[site.name], warn)
                              for kind in kinds}
        return out

    keeps_global: dict[str, list[int]] = {}
    if global_kinds:  # pass 1: scores (and statistics) of every layer, then one budget
        scored = work.done("score")
        for block in conv.bar(conv.blocks, "score layers"):
            if str(block.index) in scored:
                continue
            try:
                stats = load_block(block, cached_stats=False)
                cands = candidates_of(block, stats)
            finally:
                release(block.module)
            if stats is not None:
                work.write_tensors(f"stats-{block.index:05d}.safetensors", _stats_to_tensors(stats))
            work.write_tensors(f"scores-{block.index:05d}.safetensors",
                               {f"{site}|{kind}": c.scores for site, by in cands.items() for kind, c in by.items()})
            work.finish("score", block.index, {"warnings": list(collected)})
            collected.clear()
            if calib is not None:
                calib.forget(block)
        scores = {}
        for block in conv.blocks:
            scores.update(work.read_tensors(f"scores-{block.index:05d}.safetensors"))
        for kind in global_kinds:
            keeps_global[kind] = choose([_Scores(scores[f"{s.name}|{kind}"]) for s in sites],
                                        ratio=config.ratio_for(kind), threshold=None, allocation="global",
                                        what=f"--{kind}-ratio")

    done = work.done("write")
    position = {s.name: i for i, s in enumerate(sites)}
    for block in conv.bar(conv.blocks, "prune"):
        if str(block.index) in done:
            continue
        layers, kv, params = [], [0, 0], 0
        rewritten = {}
        try:
            stats = load_block(block, cached_stats=bool(global_kinds))
            for site, by_kind in candidates_of(block, stats).items():
                site_obj = next(s for s in block.sites if s.name == site)
                keeps = {kind: keeps_global[kind][position[site]] if kind in keeps_global else
                         choose([c], ratio=config.ratio_for(kind), threshold=config.threshold_for(kind),
                                allocation="uniform", what=f"--{kind}-ratio", names=[site])[0]
                         for kind, c in by_kind.items()}
                before = adapter.read(site_obj)
                new, layer, intended = prune_block(site_obj, before, by_kind, keeps)
                count_below_threshold(config, layer, {k: (c, keeps[k]) for k, c in by_kind.items()})
                adapter.write(site_obj, new)
                check_block(adapter, site_obj, intended)
                layers.append(asdict(layer))
                state = _site_state(site_obj)
                params += sum(t.numel() for t in state.values()) - sum(
                    _numel(conv.checkpoint.tensors[n].shape) for n in adapter.tensor_names(site_obj))
                if site_obj.role == "self":
                    size = new.k.weight.element_size()
                    kv[0] += (before.k.weight.shape[0] + before.v.weight.shape[0]) * size
                    kv[1] += (new.k.weight.shape[0] + new.v.weight.shape[0]) * size
                rewritten.update(state)
        finally:
            release(block.module)
        record = conv.write_block(block, rewritten)
        work.finish("write", block.index, {**record, "layers": layers, "kv": kv, "params": params,
                                           "warnings": list(collected)})
        collected.clear()
        if calib is not None and not global_kinds:
            calib.forget(block)
        conv.block_done(block)
    conv.copy_rest()

    records = [done[str(b.index)] for b in conv.blocks]
    layers = [LayerRanks(**lr) for r in records for lr in r["layers"]]
    all_warnings = [w for phase in ("score", "write") for r in work.done(phase).values() for w in r["warnings"]]
    params_before = sum(_numel(i.shape) for i in conv.checkpoint.tensors.values())
    report = make_report(config, conv.config.model_type, layers, params_before,
                         params_before + sum(r["params"] for r in records), sum(r["kv"][0] for r in records),
                         sum(r["kv"][1] for r in records), 0 if not needs else config.calibration.numel(),
                         all_warnings)
    if would_choose:
        report.notes.append("--vo-whitening auto prunes once per choice with the whole model in memory; streamed "
                            "with mixed (pass --vo-whitening input to stream the other, or --no-stream to choose)")
    new_config = pruned_config(conv.config, layers, task, type(conv.model).__name__)
    new_config.dtype = conv.dtype
    new_config.auto_map = modeling.auto_map(new_config.model_type)
    with disk_errors(work.path, work.hint):
        new_config.save_pretrained(work.path)
        source_file = modeling.remote_code_file(new_config.model_type)
        shutil.copyfile(source_file, work.path / source_file.name)
    conv.publish({"model": str(source), **report.to_dict(), "streamed": True})
    return report


def _numel(shape) -> int:
    count = 1
    for n in shape:
        count *= n
    return count
