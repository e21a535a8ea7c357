"""``finetune``: one method (CLOVER, or LoRA / PiSSA / DoRA from peft, or full) trained by the Hugging Face Trainer.

Everything about devices and parallelism comes from the Trainer / accelerate: run under ``accelerate launch`` (or
``torchrun``) for DDP or FSDP with no code change. Checkpoints are the Trainer's own (model, optimiser, scheduler,
RNG and data position), kept in a run directory that records the method; a checkpoint counts only once a commit
marker is written after it, so an interrupted save is never resumed from. The final merged model is written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CloverError
from .attach import TuneConfig, attach, is_attached, merge_, trainable_parameters
from .lr_scales import module_scales, parameter_scales, parse_lr_scales, split_groups
from .modules import CORE_SCALES
from .targets import lora_parameter_count, match_lora, target_modules, target_names

METHODS = ("clover", "lora", "pissa", "dora", "full")
RUN_MARKER = "clover_finetune.json"
COMMIT_MARKER = "clover_checkpoint_complete.json"


@dataclass
class FinetuneConfig:
    """A training run. ``lora_r`` is the rank of LoRA / PiSSA / DoRA; ``match_lora_r`` makes CLOVER pick the
    subset of its targets whose trainable count is closest to LoRA at that rank on the same modules."""

    method: str = "clover"
    targets: tuple[str, ...] | str | None = None
    lora_r: int = 8
    match_lora_r: int | None = None
    dropout: float = 0.0
    train_bias: bool = False
    steps: int = 100
    lr: float = 1e-4
    lr_scales: tuple[tuple[str, float], ...] | str | dict = ()  # target -> multiplier of lr (``lr_scales``)
    adam_eps: float | None = None  # Adam's epsilon (None: the Trainer's 1e-8); see ``check``
    core_scale: str = "unit"  # CLOVER only: how a core step is spread over directions (``attach.TuneConfig``)
    batch_size: int = 4
    grad_accum: int = 1
    seqlen: int = 256
    save_steps: int = 50
    logging_steps: int = 10
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    seed: int = 0
    resume: bool = True
    data: str | None = None  # the training data's fingerprint (path and content hash), part of the run's identity
    teacher: str | None = None  # distillation (``clover heal``): the teacher the loss matches, part of the identity

    def __post_init__(self):
        self.lr_scales = parse_lr_scales(self.lr_scales)

    def check(self) -> None:
        if self.method not in METHODS:
            raise CloverError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.targets is not None:  # None: the model's default targets, known only once it loads
            target_names(self.targets)
        for name in ("steps", "batch_size", "grad_accum", "save_steps", "lora_r", "logging_steps"):
            if getattr(self, name) < 1:
                raise CloverError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            raise CloverError(f"learning rate {self.lr} is not positive: pass --lr such as 1e-4")
        # Adam divides each entry's step by sqrt(v) + eps: at the default 1e-8 an entry whose gradient is tiny still
        # moves by about the lr, while an eps near the gradients' own scale shrinks those steps (SGD-like there).
        if self.adam_eps is not None and not self.adam_eps > 0:
            raise CloverError(f"--adam-eps {self.adam_eps} is not positive: pass one such as 1e-3, or leave it out")
        if self.core_scale not in CORE_SCALES:
            raise CloverError(f"unknown --core-scale {self.core_scale!r}: use one of {', '.join(CORE_SCALES)}")
        if self.core_scale != "unit" and self.method != "clover":
            raise CloverError(f"--core-scale scales CLOVER's cores: use it with --method clover, not {self.method}")
        if self.match_lora_r is not None and self.method != "clover":
            raise CloverError("--match-params-of sizes CLOVER against LoRA: use it with --method clover")


@dataclass
class MethodSetup:
    model: nn.Module  # what the Trainer trains (a peft wrapper for lora / pissa / dora)
    method: str
    trainable: int
    details: dict = field(default_factory=dict)


def prepare(model: nn.Module, config: FinetuneConfig, progress: bool = True) -> MethodSetup:
    """Make ``model`` trainable with ``config.method``; returns what to train and its trainable parameter count."""
    config.check()
    if config.method == "clover":
        details = {}
        targets = config.targets
        if config.match_lora_r is not None:
            targets, count, lora = match_lora(model, targets, config.match_lora_r, config.train_bias)
            details.update(match_lora_r=config.match_lora_r, lora_trainable=lora, clover_trainable_planned=count)
        if not is_attached(model):
            report = attach(model, TuneConfig(targets=targets, dropout=config.dropout, train_bias=config.train_bias,
                                              core_scale=config.core_scale, progress=progress))
            details["targets"] = list(report.targets)
        else:
            details["targets"] = list(model._clover_finetune.targets)
            attached = model._clover_finetune.config.core_scale
            if attached != config.core_scale:
                raise CloverError(f"this model's cores were attached with core scale {attached!r}, not "
                                  f"{config.core_scale!r}: pass --core-scale {attached}, or decompose it again")
        return MethodSetup(model, "clover", trainable_parameters(model), details)
    if is_attached(model):
        raise CloverError(f"this model carries CLOVER tuners, so it cannot be trained with {config.method}: "
                          "load the original model, or use --method clover")
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return MethodSetup(model, "full", trainable_parameters(model))
    from peft import LoraConfig, get_peft_model

    modules = target_modules(model, config.targets)
    init = {"lora": True, "dora": True, "pissa": "pissa"}[config.method]
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_r, lora_dropout=config.dropout,
                             target_modules=modules, init_lora_weights=init, use_dora=config.method == "dora",
                             bias="lora_only" if config.train_bias else "none")
    import warnings

    with warnings.catch_warnings(), _named_modules_only(model):
        warnings.simplefilter("ignore", UserWarning)  # GPT-2's Conv1D needs fan_in_fan_out: peft warns, then sets it
        wrapped = get_peft_model(model, lora_config)
    details = {"lora_r": config.lora_r, "target_modules": len(modules),
               "lora_formula": lora_parameter_count(model, modules, config.lora_r)}
    return MethodSetup(wrapped, config.method, trainable_parameters(wrapped), details)


@contextmanager
def _named_modules_only(model: nn.Module):
    """peft 0.21 rewrites the targets of model types whose MoE experts transformers v5 fuses (DeepSeek-V3 among
    them): any name ending in ``up_proj`` is taken for half of a fused expert and refused alone, even a dense MLP's
    ``nn.Linear``. clover passes the exact names of existing modules, so the rewrite is never wanted: the model
    type is hidden from peft while it wraps the model (and restored, so the saved config is the stock one)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "model_type", None):
        yield
        return
    own = vars(config).get("model_type")  # set on the instance by some loaders, else the class attribute
    config.model_type = f"clover-peft-{config.model_type}"
    try:
        yield
    finally:
        if own is None:
            del config.model_type
        else:
            config.model_type = own


def merged(setup: MethodSetup) -> nn.Module:
    """The plain model with the training folded into its weights (outputs checked before and after for CLOVER)."""
    if setup.method == "clover":
        merge_(setup.model)
        return setup.model
    if setup.method == "full":
        return setup.model
    return setup.model.merge_and_unload()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw bytes (on the CPU, row-major): what the digests hash, so equal bytes mean equal weights."""
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names, shapes, bytes): equal digests, equal models."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


# --- checkpoints -------------------------------------------------------------------------------------------------

# What makes two runs the same run: a checkpoint may only be resumed by a run that agrees on all of these.
RUN_IDENTITY = ("method", "targets", "lora_r", "match_lora_r", "train_bias", "dropout", "seqlen", "batch_size",
                "grad_accum", "lr", "lr_scales", "adam_eps", "core_scale", "steps", "lr_scheduler", "warmup_steps",
                "seed", "data", "teacher")


def data_fingerprint(path: str | os.PathLike) -> str:
    """The training file's path and the SHA-256 of its bytes: other text under the same name is other data."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{Path(path).resolve()} sha256:{digest.hexdigest()}"


def _run_settings(config: FinetuneConfig, model_name: str) -> dict:
    settings = {k: v for k, v in asdict(config).items() if k in RUN_IDENTITY}
    if isinstance(settings["targets"], tuple):
        settings["targets"] = list(settings["targets"])
    settings.pop("lr_scales")  # these three only when set, so that runs from before they existed still resume
    if config.lr_scales:
        settings["lr_scales"] = dict(config.lr_scales)
    if settings["adam_eps"] is None:
        settings.pop("adam_eps")
    if settings["core_scale"] == "unit":
        settings.pop("core_scale")
    return {"model": model_name, **settings}


def check_run_dir(run_dir: Path, settings: dict) -> None:
    """Refuse to resume checkpoints written by another run (model, method, data, lr, steps, ...) with a message
    naming what differs and the fix: resuming them would silently train, or return, another model."""
    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        if run_dir.is_dir() and any(run_dir.glob("checkpoint-*")):
            raise CloverError(f"{run_dir} holds checkpoints clover did not write (no {RUN_MARKER}): "
                              "pass another --checkpoints directory")
        return
    previous = json.loads(marker.read_text())
    differ = [key for key in ("model", *RUN_IDENTITY) if previous.get(key) != settings.get(key)]
    if differ:
        shown = "; ".join(f"{key} {previous.get(key)!r} there, {settings.get(key)!r} now" for key in differ[:3])
        raise CloverError(f"checkpoints in {run_dir} belong to another run ({shown}): pass --overwrite (or "
                          "--no-resume) to start fresh, or another --checkpoints directory")


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose commit marker exists (an interrupted save has none and is skipped)."""
    done = [p for p in run_dir.glob("checkpoint-*") if (p / COMMIT_MARKER).is_file() and p.name[11:].isdigit()]
    return max(done, key=lambda p: int(p.name[11:])) if done else None


def _drop_incomplete(run_dir: Path) -> None:
    for path in run_dir.glob("checkpoint-*"):
        if not (path / COMMIT_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)


def _commit_callback(settings: dict):
    from transformers import TrainerCallback

    class CommitCheckpoint(TrainerCallback):
        """Runs after the Trainer has written a whole checkpoint: mark it complete (and record the method)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / COMMIT_MARKER).write_text(json.dumps({**settings, "step": state.global_step}) + "\n")
            return control

    return CommitCheckpoint()


# --- the run ------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    method: str
    trainable: int
    total: int
    steps: int
    train_loss: float | None
    resumed_from: str | None
    wall_s: float
    digest: str
    details: dict = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    engine: str = "NO"  # accelerate's distributed type: NO, MULTI_CPU / MULTI_GPU (DDP), FSDP, DEEPSPEED
    heldout_loss: float | None = None  # ``late_heldout_loss``: the last quarter's loss on windows not yet trained on

    def to_dict(self) -> dict:
        return asdict(self)


def train(model: nn.Module, tokenizer, dataset, config: FinetuneConfig, run_dir: str | os.PathLike,
          model_name: str = "model", progress: bool = True, log=print,
          loss: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> tuple[nn.Module, FinetuneResult]:
    """Train with the Trainer, resuming from the last complete checkpoint in ``run_dir``; return the merged model.

    ``loss(model, batch)`` replaces the causal-LM loss (``clover heal`` passes a distillation loss); everything
    else (checkpoints, resume, merging) is the same run."""
    import time

    from transformers import Trainer, TrainingArguments, default_data_collator

    config.check()
    run_dir = Path(run_dir)
    settings = _run_settings(config, model_name)
    if config.resume:
        check_run_dir(run_dir, settings)
    modules = module_scales(model, config.method, config.targets, config.lr_scales)  # before peft wraps it
    setup = prepare(model, config, progress=progress)
    scaled = parameter_scales(setup.model, setup.method, config.lr_scales, modules, setup.details.get("targets", ()))
    total = sum(p.numel() for p in setup.model.parameters())
    log(f"method {setup.method}: {setup.trainable:,} trainable parameters of {total:,} "
        f"({100 * setup.trainable / total:.3f}%)")
    if "lora_trainable" in setup.details:
        log(f"matched budget: LoRA r={config.match_lora_r} on the same modules trains "
            f"{setup.details['lora_trainable']:,}; CLOVER targets {setup.details['targets']} train {setup.trainable:,}")

    # Several processes and no GPU: DDP over gloo on CPU (what the two-process CI test runs).
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    args = TrainingArguments(
        use_cpu=cpu_processes, ddp_backend="gloo" if cpu_processes else None,
        output_dir=str(run_dir), max_steps=config.steps, learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_steps, weight_decay=0.0,
        **({} if config.adam_eps is None else {"adam_epsilon": config.adam_eps}),
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2, logging_steps=config.logging_steps,
        report_to=[], seed=config.seed, data_seed=config.seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=not progress, ddp_find_unused_parameters=False,
    )
    if config.lr_scales:
        count = sum(p.numel() for name, p in setup.model.named_parameters() if name in scaled)
        log("learning rates: " + ", ".join(f"{target} x{scale:g}" for target, scale in config.lr_scales)
            + f" of {config.lr:g} ({count:,} parameters scaled)")
    trainer_class = Trainer if loss is None else _with_loss(Trainer, loss)
    trainer_class = _with_scaled_lr(trainer_class, scaled) if scaled else trainer_class
    trainer = trainer_class(model=setup.model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                            callbacks=[_commit_callback(settings)])
    resume_from = None
    if trainer.is_world_process_zero():
        if not config.resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _drop_incomplete(run_dir)
        (run_dir / RUN_MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    if config.resume:
        last = last_complete_checkpoint(run_dir)
        resume_from = str(last) if last is not None else None
        if resume_from:
            log(f"resuming from {resume_from}")
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    final = merged(setup)
    digest = weights_digest(final)
    result = FinetuneResult(setup.method, setup.trainable, total, trainer.state.global_step,
                            output.training_loss if output is not None else None, resume_from, wall, digest,
                            setup.details, trainer.accelerator.process_index, trainer.accelerator.num_processes,
                            str(trainer.accelerator.distributed_type.value),
                            late_heldout_loss(trainer.state.log_history, config.steps, trainer.state.epoch))
    _check_ranks_agree(trainer, run_dir, digest)
    return final, result


def late_heldout_loss(history: list[dict], steps: int, epochs: float | None) -> float | None:
    """The mean loss logged over the run's last quarter of steps, when the run made at most one pass over its
    windows; None otherwise, or when nothing was logged there.

    Within one pass every window is drawn once, and its loss is taken before the step that trains on it, so this is
    the model's loss on data it had not seen, measured on the training split alone: a figure to choose settings such
    as the learning rate by, without reading the test split. The last quarter, because the start says little about
    where a run ends (a learning rate that ends lower may start higher)."""
    if epochs is None or epochs > 1.0 + 1e-9:
        return None
    late = [entry["loss"] for entry in history if "loss" in entry and entry.get("step", 0) > 0.75 * steps]
    return sum(late) / len(late) if late else None


def _with_scaled_lr(trainer_class, scaled: dict):
    class ScaledLrTrainer(trainer_class):
        """The Trainer's own optimiser, groups and schedule, each group split by learning-rate scale."""

        def create_optimizer(self, model=None):
            fresh = self.optimizer is None
            optimizer = super().create_optimizer(model)
            if fresh:
                split_groups(optimizer, self.model if model is None else model, scaled)
            return optimizer

    return ScaledLrTrainer


def _with_loss(trainer_class, loss):
    class LossTrainer(trainer_class):
        """The Trainer with another objective; the batch is handed over whole (labels included, unused or not)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            value = loss(model, inputs)
            return (value, None) if return_outputs else value

    return LossTrainer


def _check_ranks_agree(trainer, run_dir: Path, digest: str) -> None:
    """Every rank records the digest of its merged weights; under several processes they must all be equal."""
    state = trainer.accelerator.state
    if state.num_processes <= 1:
        return
    (run_dir / f"merged-rank{state.process_index}.sha256").write_text(digest + "\n")
    trainer.accelerator.wait_for_everyone()
    digests = {(run_dir / f"merged-rank{i}.sha256").read_text().strip() for i in range(state.num_processes)}
    if len(digests) != 1:
        raise CloverError(f"the {state.num_processes} processes ended with different merged weights: "
                          "check that every rank loads the same model (use a decomposed checkpoint, --init-only)")
