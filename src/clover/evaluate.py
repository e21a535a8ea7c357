"""Perplexity with the protocol published WikiText-2 numbers use, so ours can be compared with theirs.

The protocol: tokenize the whole joined text once with the tokenizer's defaults (``tokenizer(text).input_ids``,
i.e. whatever special tokens the tokenizer adds by itself -- a BOS at the very start for Llama-style tokenizers,
nothing for GPT-2 or SmolLM2), cut it into non-overlapping windows of exactly ``seqlen`` tokens, drop the ragged
tail, and average the next-token NLL over every predicted position (``seqlen - 1`` per window). Windows share no
context, which is what makes the number depend on ``seqlen`` -- so it is always reported with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clover.errors import CloverError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    windows: int
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    seqlen: int


def context_length(config) -> int | None:
    """The longest sequence the model has positions for, or None when the config does not say."""
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        configs.append(get_text())  # multimodal configs keep it on the text sub-config
    for cfg in configs:
        for attr in ("max_position_embeddings", "n_positions", "max_target_positions"):  # the last: Whisper
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    from transformers.utils import logging as hf_logging

    # The whole corpus is longer than model_max_length on purpose; the tokenizer's warning about it is noise.
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        hf_logging.set_verbosity(before)


def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean next-token NLL) of ``model`` over ``text`` cut into non-overlapping ``seqlen``-token windows."""
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input != "input_ids":
        raise CloverError(f"perplexity on text needs a language model, but {type(model).__name__} reads "
                          f"{main_input}: evaluate it with a task metric (e.g. word error rate for speech) instead")
    if tokenizer is None:
        raise CloverError("the model has no tokenizer, so perplexity cannot be measured: use a model that ships one")
    if seqlen < 2:
        raise CloverError(f"--seqlen {seqlen} leaves nothing to predict: use a sequence length of at least 2")
    if batch_size < 1:
        raise CloverError(f"batch size {batch_size} is not positive: use a batch size of at least 1")
    if max_windows is not None and max_windows < 1:
        raise CloverError(f"--max-windows {max_windows} is not positive: use at least 1 or leave it unset")
    limit = context_length(model.config)
    if limit is not None and seqlen > limit:
        raise CloverError(
            f"--seqlen {seqlen} exceeds the model's context length {limit}: pass --seqlen {limit} or smaller"
        )

    ids = _token_ids(tokenizer, text)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise CloverError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}: use a smaller --seqlen or more text"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)

    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    starts = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"perplexity (seqlen {seqlen})", unit="batch", total=len(starts))
    with torch.no_grad():
        for start in starts:
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1, :]
            # float32 at least: bf16/fp16 log-softmax over a large vocabulary loses digits the comparison needs.
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total += nll.double().cpu()

    tokens = n_windows * (seqlen - 1)
    mean_nll = total.item() / tokens
    return PerplexityResult(ppl=math.exp(mean_nll), nll=mean_nll, windows=n_windows, tokens=tokens, seqlen=seqlen)
