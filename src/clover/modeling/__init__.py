"""Runtime for pruned models: one self-contained ``clover_<family>.py`` per family, registered with the Auto classes.

Each file imports only torch and transformers, so ``save`` can copy it next to the weights and a checkpoint loads
with ``trust_remote_code=True`` where clover is not installed. Importing this package registers the classes, so
after ``import clover`` a plain ``AutoModelForCausalLM.from_pretrained(dir)`` works too.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..errors import CloverError

# base model_type -> module holding its pruned classes (CLASSES). Families whose pruned model is not such a runtime
# (DeepSeek-V2: a stock class with a new config; diffusers UNets) build it in their adapter's ``build_pruned``.
# Mistral and Qwen2 share LLaMA's attention and prune into clover_llama (see clover_llama.llama_settings).
FAMILIES = {"llama": "clover_llama", "mistral": "clover_llama", "qwen2": "clover_llama", "gpt2": "clover_gpt2",
            "bert": "clover_bert", "whisper": "clover_whisper",
            "mllama": "clover_mllama"}
# Runtimes that are not the pruned form of one family: model_type -> module (latent attention, clover.latent).
RUNTIMES = {"clover_latent_llama": "clover_latent_llama", "clover_latent_gpt2": "clover_latent_gpt2"}
# CLASSES key -> (Auto class, auto_map key)
TASKS = {
    "base": (AutoModel, "AutoModel"),
    "causal_lm": (AutoModelForCausalLM, "AutoModelForCausalLM"),
    "masked_lm": (AutoModelForMaskedLM, "AutoModelForMaskedLM"),
    "speech_seq2seq": (AutoModelForSpeechSeq2Seq, "AutoModelForSpeechSeq2Seq"),
    "image_text_to_text": (AutoModelForImageTextToText, "AutoModelForImageTextToText"),
    "sequence_classification": (AutoModelForSequenceClassification, "AutoModelForSequenceClassification"),
}
# What each CLASSES key is called in messages.
TASK_NAMES = {"base": "base model (no head)", "causal_lm": "causal LM", "masked_lm": "masked LM",
              "speech_seq2seq": "speech seq2seq", "image_text_to_text": "image-text-to-text",
              "sequence_classification": "sequence classification"}


def family_module(model_type: str) -> ModuleType:
    if model_type in RUNTIMES:
        return importlib.import_module(f"{__name__}.{RUNTIMES[model_type]}")
    base = model_type.removeprefix("clover_")
    if base not in FAMILIES:
        raise CloverError(f"pruning is not supported for model type {model_type!r} yet: supported are "
                          f"{', '.join(sorted(FAMILIES))} (orthogonalize works for every adapter)")
    return importlib.import_module(f"{__name__}.{FAMILIES[base]}")


def register_all() -> None:
    for name in dict.fromkeys([*FAMILIES.values(), *RUNTIMES.values()]):
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:  # a family file not shipped in this build
            continue
        classes = getattr(module, "CLASSES", None)
        if classes is None:  # a stock-class family: nothing to register
            continue
        config_cls = classes["config"]
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for key, (auto, _) in TASKS.items():
            if key in classes:
                auto.register(config_cls, classes[key], exist_ok=True)


def task_of(model) -> str:
    """Which CLASSES entry matches this model object (causal LM, masked LM, speech seq2seq, image-text-to-text
    or bare model)."""
    names = [c.__name__ for c in type(model).__mro__]
    if getattr(model, "main_input_name", None) == "input_features" and any(
            n.endswith("ForConditionalGeneration") for n in names):
        return "speech_seq2seq"  # e.g. WhisperForConditionalGeneration: audio features in, tokens out
    if any(n.endswith("ForCausalLM") or n.endswith("LMHeadModel") for n in names):
        return "causal_lm"
    if any(n.endswith("ForMaskedLM") for n in names):
        return "masked_lm"
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "sequence_classification"
    if any(n in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values() for n in names):  # clover classes subclass them
        return "image_text_to_text"
    return "base"


def task_of_architecture(name: str) -> str | None:
    """The CLASSES key of a class *name* as ``config.architectures`` holds it; None for a head clover has no
    runtime for (token classification, question answering, ...)."""
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if name in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values() or name.removeprefix("Clover") in \
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values():
        return "image_text_to_text"
    if name.endswith("ForConditionalGeneration") and name.startswith(("Whisper", "CloverWhisper")):
        return "speech_seq2seq"
    if name.endswith("Model") and "For" not in name:
        return "base"
    return None


def check_head(model_type: str, class_name: str, task: str | None) -> None:
    """Refuse a head (``task``, a CLASSES key) that the family's pruned runtime cannot hold, naming those it can."""
    base = model_type.removeprefix("clover_")
    if base not in FAMILIES:
        return
    classes = getattr(family_module(base), "CLASSES", None)
    if classes is not None and task not in classes:
        have = ", ".join(TASK_NAMES[k] for k in classes if k != "config")
        raise CloverError(f"pruning a {class_name} is not supported: clover's pruned {base} runtime holds these "
                          f"heads: {have}; orthogonalize works on any head")


def check_prunable(config) -> None:
    """``check_head`` from the config alone, before any weights load."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        check_head(config.model_type, architectures[0], task_of_architecture(architectures[0]))


def remote_code_file(model_type: str) -> Path:
    return Path(family_module(model_type).__file__)


def auto_map(model_type: str) -> dict[str, str]:
    module = family_module(model_type)
    stem = Path(module.__file__).stem
    classes = module.CLASSES
    out = {"AutoConfig": f"{stem}.{classes['config'].__name__}"}
    for key, (_, auto_name) in TASKS.items():
        if key in classes:
            out[auto_name] = f"{stem}.{classes[key].__name__}"
    return out
