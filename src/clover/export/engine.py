"""Running a GGUF in llama.cpp (through llama-cpp-python) to prove an export: logits for token ids, perplexity on
the same windows clover evaluates, and the KV buffer llama.cpp allocates.

llama-cpp-python is built from source by ``scripts/setup`` (pinned, portable: ``GGML_NATIVE=OFF``) because it is
the PyPI route that exposes logits; without it these functions say how to install it.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import CloverError


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def _require() -> None:
    if not available():
        raise CloverError("llama.cpp's Python binding is not installed: run scripts/setup (it builds the pinned "
                          "llama-cpp-python), or pip install llama-cpp-python==0.3.36")


@contextmanager
def _quiet_stderr():
    """llama.cpp prints its load log to the C-level stderr; keep it off the user's screen."""
    fd = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def load(path: str | Path, n_ctx: int, threads: int = 1, flash_attn: bool = False, logits_all: bool = True,
         type_k: int | None = None, type_v: int | None = None):
    """A llama.cpp context on ``path`` (CPU, ``threads`` threads, ``n_ctx`` tokens)."""
    _require()
    import llama_cpp

    kwargs = {} if type_k is None else {"type_k": type_k, "type_v": type_v if type_v is not None else type_k}
    with _quiet_stderr():
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                                   flash_attn=flash_attn, verbose=False, **kwargs)
        except ValueError as error:
            raise CloverError(f"llama.cpp could not load {path} ({error}): the file does not fit its architecture's "
                              "rules") from None


F32, F16, Q8_0 = 0, 1, 8  # ggml type ids of KV-cache types (llama.cpp's default cache is f16)


def logits(path: str | Path, ids: torch.Tensor, threads: int = 1, cache_type: int = F32) -> torch.Tensor:
    """llama.cpp's logits (tokens, vocab) for one sequence of token ids, all positions. The cache is float32 by
    default, so a comparison with transformers measures the export, not the cache's rounding."""
    llm = load(path, n_ctx=max(len(ids), 8), threads=threads, type_k=cache_type)
    with _quiet_stderr():
        llm.eval([int(t) for t in ids])
    scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return torch.from_numpy(scores)


def perplexity(path: str | Path, windows: torch.Tensor, threads: int = 1, cache_type: int | None = None,
               flash_attn: bool = False) -> float:
    """exp(mean next-token NLL) over ``windows`` (n, seqlen): the protocol of ``clover.evaluate.perplexity``
    (disjoint windows, every window's first token unpredicted). ``cache_type``: llama.cpp's default (f16) if None."""
    llm = load(path, n_ctx=windows.shape[1], threads=threads, type_k=cache_type, flash_attn=flash_attn)
    total, count = 0.0, 0
    for row in windows:
        llm.reset()
        with _quiet_stderr():
            llm.eval([int(t) for t in row])
        scores = torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float64))
        nll = torch.nn.functional.cross_entropy(scores[:-1], row[1:].long(), reduction="sum")
        total += float(nll)
        count += len(row) - 1
    llm.close()
    return math.exp(total / count)
