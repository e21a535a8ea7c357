"""``attach`` / ``merge_``: put trainable singular-value cores into a model, and fold them back into plain weights.

After ``attach`` only the cores (and, with ``train_bias``, the biases) require gradients and the model computes
exactly what it computed before (checked). ``merge_`` writes the tuned weights into the original parameters,
removes every trace of the tuners and checks the outputs did not move, so the model saves and loads like any other.

``save_decomposed`` / ``load_decomposed`` exist for distributed training: the SVDs need whole weight matrices,
which ZeRO-3 / FSDP shard, so the decomposition is done once offline and every rank loads the result.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CloverError
from ..output import atomic_dir
from ..verify import Check, compare, model_outputs
from .modules import CORE_SCALES, TUNER_NAME, BlockTuner, SiteTuner, Tuner
from .targets import block_size, resolve_targets

STATE_ATTR = "_clover_finetune"
DECOMPOSED_CONFIG = "clover_tune.json"
DECOMPOSED_WEIGHTS = "clover_decomposed.safetensors"


@dataclass
class TuneConfig:
    """What to train. ``targets`` None picks the paper's recipe for the model (see ``targets.default_targets``).

    ``dropout`` drops inputs of the update path only (LoRA's meaning); ``train_bias`` also trains every bias of the
    targeted projections (the paper's CLOVER-dagger). ``core_scale`` "spectrum" scales the frozen factors of the
    singular-value cores (qk, vo, up) so that a core step moves strong directions more than weak ones
    (``modules._scaled_start``); the QR cores (k, rope) are the same either way.
    """

    targets: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    train_bias: bool = False
    core_scale: str = "unit"
    verify: bool = True
    progress: bool = True


@dataclass
class AttachReport:
    targets: tuple[str, ...]
    trainable_parameters: int
    total_parameters: int
    check: Check | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["check"] = None if self.check is None else self.check.to_dict()
        return out


@dataclass
class _State:
    config: TuneConfig
    targets: tuple[str, ...]
    tuners: list[Tuner] = field(default_factory=list)
    requires_grad: dict[int, bool] = field(default_factory=dict)


def is_attached(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attach(model: nn.Module, config: TuneConfig | None = None, *, initialise: bool = True) -> AttachReport:
    """Attach CLOVER tuners in place. ``initialise=False`` builds zero-filled cores of the right shapes (for
    ``load_decomposed``, which fills them from a file) and skips the check."""
    config = config or TuneConfig()
    if is_attached(model):
        raise CloverError("this model already has CLOVER tuners attached: merge_ it first or start from the original")
    if not 0.0 <= config.dropout < 1.0:
        raise CloverError(f"dropout {config.dropout} is outside [0, 1): pick a probability such as 0.05")
    if config.core_scale not in CORE_SCALES:
        raise CloverError(f"unknown core scale {config.core_scale!r}: use one of {', '.join(CORE_SCALES)}")
    adapter, sites, targets = resolve_targets(model, config.targets)
    check = config.verify and initialise
    was_training = model.training
    model.eval()
    inputs = adapter.example_inputs(model) if check else None
    reference = model_outputs(model, inputs) if check else None

    state = _State(config, targets, requires_grad={id(p): p.requires_grad for p in model.parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    attention = tuple(t for t in targets if t != "up")
    if attention:
        for site in tqdm(sites, desc="attach", unit="block", disable=not config.progress):
            tuner = SiteTuner(adapter, site, attention, config.dropout, config.train_bias, initialise,
                              config.core_scale)
            _install(site.module, tuner, state)
    if "up" in targets:
        block = block_size(model)
        for _, module in adapter.mlp_up(model):
            _install(module, BlockTuner(module, block, config.dropout, config.train_bias, initialise,
                                        config.core_scale), state)
    setattr(model, STATE_ATTR, state)
    model.eval()  # the new tuners start in training mode (dropout on) like any fresh module

    report = AttachReport(targets, trainable_parameters(model), sum(p.numel() for p in model.parameters()))
    if check:
        report.check = compare(reference, model, inputs)
        if not report.check.passed:
            merge_(model, verify=False)
            raise CloverError(f"attach changed the model's outputs by {report.check.relative_diff:.2e} of their "
                              f"scale (tolerance {report.check.tolerance:.0e}): load the model in float32")
    model.train(was_training)
    return report


def _install(module: nn.Module, tuner: Tuner, state: _State) -> None:
    if hasattr(module, TUNER_NAME):
        raise CloverError("this model already has CLOVER tuners attached: merge_ it first")
    module.add_module(TUNER_NAME, tuner)
    tuner.install()
    state.tuners.append(tuner)


def merge_(model: nn.Module, verify: bool = True) -> Check | None:
    """Fold the tuned cores into plain weights (same shapes as before ``attach``) and remove the tuners.

    With ``verify``, the outputs before and after merging are compared and a mismatch raises ``CloverError``.
    """
    state: _State | None = getattr(model, STATE_ATTR, None)
    if state is None:
        raise CloverError("this model has no CLOVER tuners to merge: call clover.finetune.attach first")
    was_training = model.training
    model.eval()
    adapter = None
    if verify:
        from ..adapters import adapter_for

        adapter = adapter_for(model)
        inputs = adapter.example_inputs(model)
        reference = model_outputs(model, inputs)
    for tuner in state.tuners:
        owner = tuner.owner()
        tuner.merge()
        delattr(owner, TUNER_NAME)
    for p in model.parameters():
        p.requires_grad_(state.requires_grad.get(id(p), True))
    delattr(model, STATE_ATTR)
    if not verify:
        model.train(was_training)
        return None
    check = compare(reference, model, inputs)
    model.train(was_training)
    if not check.passed:
        raise CloverError(f"merging moved the outputs by {check.relative_diff:.2e} of their scale "
                          f"(tolerance {check.tolerance:.0e}): fine-tune in float32")
    return check


def save_decomposed(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save an attached model (base config, every weight, the cores and factors) so ranks can load it without SVD."""
    from safetensors.torch import save_model

    state: _State | None = getattr(model, STATE_ATTR, None)
    if state is None:
        raise CloverError("save_decomposed needs a model with CLOVER tuners attached: call attach first")
    with atomic_dir(out, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / DECOMPOSED_WEIGHTS))
        settings = {"targets": list(state.targets), "dropout": state.config.dropout,
                    "train_bias": state.config.train_bias, "core_scale": state.config.core_scale}
        (tmp / DECOMPOSED_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return Path(out)


def is_decomposed_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / DECOMPOSED_CONFIG).is_file()


def load_decomposed(path: str | os.PathLike, dtype: torch.dtype | None = None, dropout: float | None = None):
    """``(model, tokenizer, TuneConfig)`` from ``save_decomposed``: the model is built from its config, tuners of
    the saved shapes are attached empty, and every tensor is filled from the file (no SVD, same on every rank)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoTokenizer

    from .. import modeling  # noqa: F401  (registers the pruned model types)
    from ..models import model_from_config

    path = Path(path)
    if not is_decomposed_dir(path):
        raise CloverError(f"{path} is not a decomposed CLOVER checkpoint (no {DECOMPOSED_CONFIG}): "
                          "write one with `clover finetune MODEL --method clover --init-only --out DIR`")
    settings = json.loads((path / DECOMPOSED_CONFIG).read_text())
    config = AutoConfig.from_pretrained(path)
    model = model_from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    tune = TuneConfig(targets=tuple(settings["targets"]), dropout=settings["dropout"] if dropout is None else dropout,
                      train_bias=settings["train_bias"], core_scale=settings.get("core_scale", "unit"), verify=False,
                      progress=False)
    attach(model, tune, initialise=False)
    missing, unexpected = load_model(model, str(path / DECOMPOSED_WEIGHTS), strict=False)
    if missing or unexpected:
        raise CloverError(f"decomposed checkpoint {path} does not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}): write it again with --init-only")
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer, tune
