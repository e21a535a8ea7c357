"""Tokenizer metadata for a GGUF: carried over from the source GGUF where there is one (SmolLM2's own file has the
pre-tokenizer name, merges, special ids and chat template llama.cpp expects), else built from the saved
``tokenizer.json`` (a byte-level BPE, llama.cpp's ``gpt2`` tokenizer model)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ..errors import CloverError


def copy_from_gguf(writer: gguf.GGUFWriter, source: str | Path) -> int:
    """Every ``tokenizer.*`` field of ``source`` into ``writer``; returns the number of tokens."""
    reader = gguf.GGUFReader(str(source))
    tokens = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        value = field.contents()
        if main == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, main, sub_type=field.types[-1])
            if key == "tokenizer.ggml.tokens":
                tokens = len(value)
        else:
            writer.add_key_value(key, value, main)
    if not tokens:
        raise CloverError(f"{source} holds no tokenizer.ggml.tokens: pass a GGUF with a tokenizer to --tokenizer-from")
    return tokens


def build_from_folder(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> int:
    """A ``gpt2`` (byte-level BPE) vocabulary from ``tokenizer.json``, padded with unused tokens to ``vocab_size``."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CloverError(f"{folder} has no tokenizer.json to build the GGUF vocabulary from: pass --tokenizer-from "
                          "with the source GGUF (or save the tokenizer next to the weights)")
    data = json.loads(path.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise CloverError(f"tokenizer.json holds a {model.get('type')} model; the GGUF export builds byte-level BPE "
                          "vocabularies only: pass --tokenizer-from with a GGUF that has the tokenizer")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(special)
    if max(vocab.values()) >= vocab_size:
        raise CloverError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is "
                          f"{vocab_size}: the tokenizer does not belong to these weights")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json"
                                                                            ).is_file() else {}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
        name = config.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        if name in vocab:
            add(vocab[name])
    return vocab_size
