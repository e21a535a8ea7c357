"""Training text for ``clover finetune``: a file turned into fixed-length token windows for causal-LM training.

Formats: ``.txt`` (the whole file is one text), ``.jsonl`` (one JSON object per line with a ``text`` field; records
are separated by the tokenizer's EOS token) and ``.parquet`` (a ``text`` column, rows joined with blank lines as
WikiText is). The text is tokenized once and cut into windows of ``seqlen`` tokens; labels are the inputs (the
model shifts them), so every window trains next-token prediction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CloverError

FORMATS = (".txt", ".jsonl", ".parquet")


def load_texts(path: str | os.PathLike) -> list[str]:
    """The non-empty texts of a training file; missing, unknown or empty files fail with the fix."""
    path = Path(path)
    if path.is_dir():
        raise CloverError(f"training data {path} is a folder: pass --data pointing at a .txt, .jsonl or .parquet "
                          "file inside it")
    if not path.is_file():
        raise CloverError(f"training data {path} does not exist: "
                          "pass --data pointing at a .txt, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [_utf8(path)]
    elif suffix == ".jsonl":
        texts = []
        for number, line in enumerate(_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CloverError(f"training data {path} line {number} is not JSON ({error.msg}): "
                                  "write one object with a 'text' field per line") from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CloverError(f"training data {path} line {number} has no 'text' string: "
                                  "write one object with a 'text' field per line")
            texts.append(record["text"])
    elif suffix == ".parquet":
        from ..data import _read_parquet

        texts = ["\n\n".join(_read_parquet(str(path)))]
    else:
        raise CloverError(f"training data {path} has an unknown format {suffix or '(none)'}: "
                          f"use one of {', '.join(FORMATS)}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CloverError(f"training data {path} is empty: put some text in it")
    return texts


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CloverError(f"training data {path} is not UTF-8 text (byte {error.start} cannot be decoded): pass a "
                          "text file, or convert it with `iconv -t utf-8`") from None


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-length windows of one token stream, as ``{"input_ids", "labels"}`` examples."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = self.windows[i]
        return {"input_ids": ids, "labels": ids.clone()}


def token_windows(tokenizer, texts: list[str], seqlen: int) -> TokenWindows:
    if tokenizer is None:
        raise CloverError("the model has no tokenizer, so text cannot be turned into tokens: save one next to it")
    if seqlen < 2:
        raise CloverError(f"--seqlen {seqlen} leaves nothing to predict: use at least 2")
    separator = tokenizer.eos_token or "\n\n"
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the whole text is longer than model_max_length on purpose
    try:
        ids = tokenizer(separator.join(texts), return_tensors="pt").input_ids[0]
    finally:
        hf_logging.set_verbosity(before)
    n = ids.numel() // seqlen
    if n == 0:
        raise CloverError(f"training data has {ids.numel()} tokens, fewer than one window of {seqlen}: "
                          "add text or lower --seqlen")
    return TokenWindows(ids[: n * seqlen].view(n, seqlen).long())
