"""``export_gguf``: a model clover can load -> one GGUF file for llama.cpp, written with the ``gguf`` package.

One writer per target architecture (``llama.py``, ``deepseek2.py``) maps the checkpoint's tensors and config;
this module picks the writer, converts each tensor to the file type, carries the tokenizer over (``tokenizer.py``)
and writes the file atomically (a temporary sibling, renamed when complete).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..errors import CloverError
from ..output import follow_umask
from . import deepseek2, llama
from .tokenizer import build_from_folder, copy_from_gguf

FILE_TYPES = {"f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
              "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
              "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}


@dataclass
class GgufConfig:
    """``type``: f32, f16 or q8_0 (1-D tensors, and tensors the format needs exact, stay f32). ``tokenizer_from``:
    a GGUF file (or registry name) whose ``tokenizer.*`` metadata is carried over; default: the model's own source
    GGUF where it came from one (the registry's SmolLM2), else a vocabulary built from ``tokenizer.json``."""

    type: str = "f16"
    tokenizer_from: str | None = None

    def check(self) -> None:
        if self.type not in FILE_TYPES:
            raise CloverError(f"unsupported GGUF type {self.type!r}: use one of {', '.join(FILE_TYPES)}")


@dataclass
class ExportReport:
    architecture: str
    file_type: str
    path: str
    bytes: int
    tensors: int
    kept_f32: list[str] = field(default_factory=list)  # 2-D tensors kept in float32 (what the type cannot hold)
    kept_f16: list[str] = field(default_factory=list)  # q8_0: tensors whose rows its blocks cannot tile
    tokenizer: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def writer_for(config):
    """The target architecture's writer module for ``config`` (refusing what no writer takes, in one line)."""
    if config.model_type == "deepseek_v3":
        deepseek2.check(config)
        return deepseek2
    if config.model_type in llama.TYPES:
        llama.check(config)
        return llama
    if config.model_type == "clover_llama":
        raise CloverError("a pruned clover_llama has no GGUF architecture: llama.cpp's llama graph asserts one head "
                          "width for q, k and v (value length == key length), so V-O-pruned heads cannot load; "
                          "for a smaller cache in llama.cpp use clover mla (--layout mla, or --layout gqa)")
    raise CloverError(f"no GGUF writer for model type {config.model_type!r}: clover exports the LLaMA family "
                      "(llama, mistral) and its own MLA conversions (clover mla)")


def export_gguf(model, source: str | None, folder: Path | None, out: str | os.PathLike,
                config: GgufConfig) -> ExportReport:
    """Write ``model`` (a loaded transformers model) to ``out``. ``source``: the name it was loaded by (finds the
    source GGUF for the tokenizer); ``folder``: its local folder, for ``tokenizer.json``."""
    config.check()
    module = writer_for(model.config)
    kind, qtype = FILE_TYPES[config.type]
    out = Path(out)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    meta = module.metadata(model.config) if module is deepseek2 else module.metadata(model.config, head_dim)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    report = ExportReport(module.ARCH, config.type, str(out), 0, 0)
    try:
        writer = gguf.GGUFWriter(tmp, module.ARCH)  # it writes general.architecture itself
        writer.add_name(Path(str(source or "model")).name)
        for key, value in meta.items():
            _add(writer, f"{module.ARCH}.{key}", value)
        writer.add_file_type(int(kind))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        report.tokenizer = _tokenizer(writer, model, source, folder, config)
        state = model.state_dict()
        for name, array, exact in module.tensors(state, model.config):
            report.tensors += 1
            if exact or qtype == gguf.GGMLQuantizationType.F32 or array.ndim == 1:
                if array.ndim > 1 and qtype != gguf.GGMLQuantizationType.F32:
                    report.kept_f32.append(name)
                writer.add_tensor(name, array.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                if qtype != gguf.GGMLQuantizationType.F16:  # rows q8_0's blocks of 32 cannot tile, as llama.cpp does
                    report.kept_f16.append(name)
                writer.add_tensor(name, array.astype(np.float16))
            else:
                data = gguf.quants.quantize(array, qtype)
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        follow_umask(Path(tmp), folder=False)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    report.bytes = out.stat().st_size
    if report.kept_f32:
        report.notes.append(f"{len(report.kept_f32)} tensors kept in float32 ({report.kept_f32[0]}, ...): the latent "
                            "rows scaled below the norm's epsilon are below what f16 or q8_0 can hold")
    if report.kept_f16:
        report.notes.append(f"{len(report.kept_f16)} tensors kept in f16 ({report.kept_f16[0]}, ...): their rows are "
                            "not a multiple of q8_0's block of 32")
    return report


def _add(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def _tokenizer(writer, model, source: str | None, folder: Path | None, config: GgufConfig) -> str:
    from ..models import resolve

    origin = config.tokenizer_from
    if origin is None and folder is not None and (folder / "clover_report.json").is_file():
        origin = json.loads((folder / "clover_report.json").read_text()).get("model")  # what clover converted
    if origin is None:
        origin = source
    gguf_path = None
    if origin is not None:
        try:
            resolved = resolve(str(origin))
            if resolved.gguf_file is not None:
                gguf_path = Path(resolved.path) / resolved.gguf_file if Path(resolved.path).is_dir() \
                    else Path(resolved.path)
        except CloverError:
            if config.tokenizer_from is not None:
                raise
        if gguf_path is None and str(origin).endswith(".gguf") and Path(origin).is_file():
            gguf_path = Path(origin)
    if gguf_path is not None:
        tokens = copy_from_gguf(writer, gguf_path)
        if tokens != model.config.vocab_size:
            raise CloverError(f"{gguf_path} has {tokens} tokens but the model's vocabulary is "
                              f"{model.config.vocab_size}: pass --tokenizer-from with the model's own GGUF")
        return f"carried from {gguf_path.name}"
    if config.tokenizer_from is not None:
        raise CloverError(f"--tokenizer-from {config.tokenizer_from}: not a GGUF file or a model loaded from one")
    if folder is None:
        raise CloverError("no source GGUF and no model folder to take the tokenizer from: pass --tokenizer-from")
    build_from_folder(writer, folder, model.config.vocab_size)
    return "built from tokenizer.json"
