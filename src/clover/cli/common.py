"""What every ``clover`` subcommand shares: the console, the one-line failure, loading, the option types, and the
checks that run before any weights load."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..errors import CloverError

console = Console()
err_console = Console(stderr=True)


DTYPES = ("float32", "bfloat16", "float16")


def fails_cleanly(fn):
    """Turn a CloverError into one line on stderr and exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..output import release_all

        try:
            return fn(*args, **kwargs)
        except CloverError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        finally:  # the outputs this command claimed (check_outputs) are free again, however it ended
            release_all()

    return wrapper


def comma_list(text: str) -> tuple[str, ...]:
    """An option's comma-separated names, spaces and empty items dropped ("" gives none)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def torch_dtype(name: Optional[str]):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise CloverError(f"unknown --dtype {name!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load(model: str, dtype: Optional[str]):
    from ..models import load

    with console.status(f"loading {model}"):
        return load(model, dtype=torch_dtype(dtype))


ModelArg = Annotated[str, typer.Argument(help="A registry name (smollm2-135m), a local directory, or a hub id.")]


DtypeOpt = Annotated[Optional[str], typer.Option(help="Load weights in this dtype (float32, bfloat16, float16).")]


JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the full report as JSON here.")]


EvalPplOpt = Annotated[bool, typer.Option(help="Report WikiText-2 test perplexity before and after.")]


SeqlenOpt = Annotated[int, typer.Option(help="Perplexity window length.")]


MaxWindowsOpt = Annotated[Optional[int], typer.Option(help="Perplexity on the first N windows only.")]


# The optimiser's knobs that `finetune` and `heal` share.
LrScaleOpt = Annotated[Optional[str], typer.Option(help="Per-target multipliers of --lr, e.g. up=0.5 (LoRA / PiSSA "
                                                        "scale the modules a target adapts).")]
AdamEpsOpt = Annotated[Optional[float], typer.Option(help="Adam's epsilon (default: the Trainer's 1e-8); near the "
                                                          "gradients' scale, entries with tiny gradients take smaller "
                                                          "steps.")]
CoreScaleOpt = Annotated[str, typer.Option(help="CLOVER's cores: unit (orthonormal factors, a core step moves every "
                                                "direction alike) or spectrum (factors scaled by sqrt(s / mean s): "
                                                "strong directions move more).")]


DataOpt = Annotated[Optional[Path], typer.Option(help="Evaluation corpus folder (for --eval-ppl).")]


OverwriteOpt = Annotated[bool, typer.Option(help="Replace --out if it exists.")]


CalibOpt = Annotated[Optional[Path], typer.Option(help="Calibration corpus folder (WikiText-2 validation split; else "
                                                      "$CLOVER_DATA, else the hub).")]


CalibSeqlenOpt = Annotated[int, typer.Option(help="Tokens per calibration window.")]


TaskLimitOpt = Annotated[Optional[int], typer.Option(help="Task accuracy: score only the first N documents of "
                                                            "each task (a quick look; papers use all).")]


TaskDirOpt = Annotated[Optional[Path], typer.Option(help="Task accuracy: a folder of extra lm-eval task YAMLs "
                                                         "(local data).")]


EvalTasksOpt = Annotated[Optional[str], typer.Option(help="Also report lm-eval task accuracy before and after "
                                                          "(comma-separated task names).")]


StreamOpt = Annotated[Optional[bool], typer.Option(
    "--stream/--no-stream", help="Convert layer by layer from the safetensors shards (memory: about one layer). "
    "Default: on for folders with model.safetensors.index.json.")]


def streams(model: str, stream: Optional[bool]) -> bool:
    """Whether to take the streaming path (clover.streaming) for this model argument."""
    from ..streaming import is_streamable

    if stream is None:
        return is_streamable(model)
    if stream and not Path(model).is_dir():
        raise CloverError(f"--stream needs a local checkpoint folder with safetensors weights, not {model!r}: "
                          "save the model with save_pretrained first, or drop --stream")
    if stream:
        from ..models import resolve

        if resolve(model).library == "diffusers":
            raise CloverError(f"--stream converts transformers checkpoints only and {model} is a diffusers model: "
                              "drop --stream (a UNet fits in memory)")
    return stream


def refuse_perplexity(model: str, what: str) -> None:
    """Perplexity scores text with a language model; a diffusers model (a UNet) reads none. Checked before any
    corpus or weights are loaded."""
    from ..models import resolve

    if resolve(model).library == "diffusers":
        raise CloverError(f"{what} needs a language model and {model} is a diffusers model, which reads no text: "
                          "judge it in its diffusion pipeline instead" + (f", and drop {what}"
                                                                           if what.startswith("--eval") else ""))


def check_outputs(model: str, *, out: Optional[Path] = None, overwrite: bool = False,
                  json_path: Optional[Path] = None, plot: Optional[Path] = None) -> None:
    """Every path the command will write, checked before anything loads (nothing is written on failure)."""
    from ..preflight import check_json, check_out_dir, check_plot

    if out is not None:
        check_out_dir(out, overwrite, model)
    check_json(json_path)
    check_plot(plot)


def head_task(config_or_model) -> Optional[str]:
    """The head of a config (from its architectures) or of a loaded model, as a modeling CLASSES key."""
    from .. import modeling
    from ..preflight import architecture

    if config_or_model is None:
        return None
    if hasattr(config_or_model, "forward"):
        return modeling.task_of(config_or_model)
    name = architecture(config_or_model)
    return modeling.task_of_architecture(name) if name else None


def require_causal_lm(config_or_model, model: str, what: str) -> None:
    """Next-token perplexity and causal-LM training mean nothing for other heads: refuse them by name."""
    from .. import modeling

    task = head_task(config_or_model)
    if task is None or task == "causal_lm":
        return
    name = modeling.TASK_NAMES.get(task, task)
    fix = {"masked_lm": "for an encoder, compare it with its original: clover eval MODEL --compare ORIGINAL",
           "base": "for an encoder, compare it with its original: clover eval MODEL --compare ORIGINAL",
           "speech_seq2seq": "judge a speech model by its word error rate in your own pipeline"}.get(
        task, "use a causal-LM checkpoint (architectures *ForCausalLM)")
    raise CloverError(f"{what} needs a causal language model and {model} is a {name}: {fix}")


def check_seqlens(config, seqlens: dict[str, int]) -> None:
    """Each ``{flag: tokens}`` fits the model's context (a no-op where the config is not known yet)."""
    from ..preflight import check_seqlen

    for flag, tokens in seqlens.items():
        check_seqlen(config, tokens, flag)


def default_calib_seqlen(ctx: typer.Context, target, seqlen: int) -> tuple[int, str | None]:
    """A ``--calib-seqlen`` left at its default that the model's context cannot hold becomes the context, with a
    note for the report; a value the user typed stays an error (``check_seqlens`` says so). ``target``: a config
    or a loaded model, or None where neither is known yet."""
    from ..evaluate import context_length

    source = ctx.get_parameter_source("calib_seqlen")
    if target is None or source is None or source.name != "DEFAULT":
        return seqlen, None
    limit = context_length(getattr(target, "config", target))
    if limit is None or seqlen <= limit:
        return seqlen, None
    return limit, (f"--calib-seqlen: the default {seqlen} is beyond the model's context of {limit} tokens, so "
                   f"calibration used {limit}-token windows")


def check_model_fits(target, model: str, seqlens: dict[str, int], causal_for: Optional[str] = None) -> None:
    """The checks that need the model: run on its config.json before loading (``target`` a config, or None where
    reading it is not cheap) and again on the loaded model (GGUF and hub models are only known then).
    ``causal_for`` names what needs a causal LM, if anything."""
    if causal_for:
        require_causal_lm(target, model, causal_for)
    check_seqlens(getattr(target, "config", target), seqlens)


CriterionOpt = Annotated[str, typer.Option(help="vanilla (norm product), clover (SVD) or whitened (data-aware).")]


def needs_calibration(*criteria: Optional[str]) -> bool:
    from ..criteria import DATA_AWARE

    return any(c in DATA_AWARE for c in criteria if c)


def calibration_windows(loaded, calib: Optional[Path], samples: int, seqlen: int):
    """Token windows from the validation split (never the test split), for data-aware criteria.

    A diffusers model (a UNet) reads no text: its adapter turns each row into seeded random latents and
    embeddings shaped like it, so it gets seeded random ids of the asked shape and needs no corpus."""
    import torch

    from ..data import calibration_batches

    source = getattr(loaded, "source", None)
    if source is not None and source.library == "diffusers":
        if samples < 1 or seqlen < 1:
            raise CloverError(f"calibration needs --calib-samples and --calib-seqlen >= 1, got {samples} and {seqlen}")
        return torch.randint(0, 2**15, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    if loaded.tokenizer is None:
        raise CloverError("the model folder has no tokenizer, which data-aware criteria need for calibration text: "
                          "save the tokenizer next to the weights, or use --criterion clover")
    return calibration_batches(loaded.tokenizer, calibration_rows(model_name=None, calib=calib), samples, seqlen)


@functools.lru_cache(maxsize=4)
def _validation_rows(calib: Optional[str], env: Optional[str]) -> tuple[str, ...]:
    from ..data import load_rows

    return tuple(load_rows(corpus="wikitext2", split="validation", data=calib, flag="--calib"))


def calibration_rows(model_name: Optional[str], calib: Optional[Path]) -> Optional[list[str]]:
    """The calibration text (WikiText-2 validation rows), read once: the verbs call it before any weights load so
    a missing corpus is refused first, and ``calibration_windows`` takes the same rows. None for a diffusers model,
    which reads no text."""
    import os

    from ..data import ENV_VAR

    if model_name is not None:
        from ..models import resolve

        if resolve(model_name).library == "diffusers":
            return None
    return list(_validation_rows(None if calib is None else str(calib), os.environ.get(ENV_VAR)))


def tokenizer_only(model: str):
    """For a streamed prune: the folder's tokenizer (calibration needs it), without loading any weights."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    try:
        return SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(model))
    except Exception:  # transformers raises many kinds; all mean "no usable tokenizer here"
        return SimpleNamespace(tokenizer=None)


def check_calibration_size(config, samples: int, seqlen: int) -> None:
    """Slicing estimates a hidden x hidden covariance: fewer calibration tokens than hidden dims leave it singular."""
    hidden = getattr(config, "hidden_size", None)
    if hidden and 0 < samples * seqlen < hidden:
        raise CloverError(f"--calib-samples {samples} x --calib-seqlen {seqlen} = {samples * seqlen} tokens is fewer "
                          f"than the hidden size {hidden}: the stream's covariance would be singular; raise either")
