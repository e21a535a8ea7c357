"""Perplexity against the model's own loss, on a tiny random GPT-2 and a tiny trained tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, PretrainedConfig

from clover.errors import CloverError
from clover.evaluate import context_length, perplexity
from tiny_tokenizer import SAMPLE_TEXT, tiny_tokenizer

CONTEXT = 128


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=CONTEXT)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def text():
    return "\n\n".join([SAMPLE_TEXT] * 2)


def _ids(tok, text):
    return tok(text, return_tensors="pt").input_ids[0]


def test_perplexity_is_exp_of_the_models_own_mean_loss(model, tok, text):
    seqlen = 64
    result = perplexity(model, tok, text, seqlen=seqlen, progress=False)
    ids = _ids(tok, text)
    windows = ids[: (ids.numel() // seqlen) * seqlen].view(-1, seqlen)
    with torch.no_grad():
        # HF's loss is the mean over the seqlen - 1 shifted targets; every window has as many, so means average.
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected_nll = sum(losses) / len(losses)
    assert result.nll == pytest.approx(expected_nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-5)
    assert result.windows == len(windows) >= 3
    assert result.tokens == len(windows) * (seqlen - 1)
    assert result.seqlen == seqlen


def test_ragged_tail_is_dropped(model, tok, text):
    n_tokens = _ids(tok, text).numel()
    seqlen = 50
    assert n_tokens % seqlen, "pick a seqlen that leaves a tail"
    result = perplexity(model, tok, text, seqlen=seqlen, progress=False)
    assert result.windows == n_tokens // seqlen


def test_max_windows_keeps_the_first_windows(model, tok, text):
    full = perplexity(model, tok, text, seqlen=32, progress=False)
    first = perplexity(model, tok, text, seqlen=32, max_windows=2, progress=False)
    assert (first.windows, first.tokens) == (2, 2 * 31)
    ids = _ids(tok, text)
    cut = tok.decode(ids[:64])
    assert perplexity(model, tok, cut, seqlen=32, progress=False).windows >= 2
    assert full.windows > 2 and first.ppl != full.ppl
    assert perplexity(model, tok, text, seqlen=32, max_windows=10_000, progress=False).windows == full.windows


def test_batching_does_not_change_the_result(model, tok, text):
    one = perplexity(model, tok, text, seqlen=32, batch_size=1, progress=False)
    three = perplexity(model, tok, text, seqlen=32, batch_size=3, progress=True)
    assert three.windows == one.windows
    assert three.nll == pytest.approx(one.nll, rel=1e-6)


def test_seqlen_beyond_context_names_both_numbers(model, tok, text):
    with pytest.raises(CloverError, match=rf"--seqlen {CONTEXT + 1} .* {CONTEXT}: pass --seqlen {CONTEXT}"):
        perplexity(model, tok, text, seqlen=CONTEXT + 1, progress=False)
    assert perplexity(model, tok, text, seqlen=CONTEXT, progress=False).windows >= 1


def test_text_shorter_than_one_window(model, tok):
    with pytest.raises(CloverError, match="fewer than one window of 64"):
        perplexity(model, tok, "too short", seqlen=64, progress=False)


def test_bad_arguments(model, tok, text):
    with pytest.raises(CloverError, match="no tokenizer"):
        perplexity(model, None, text, seqlen=32)
    with pytest.raises(CloverError, match="at least 2"):
        perplexity(model, tok, text, seqlen=1)
    with pytest.raises(CloverError, match="--max-windows"):
        perplexity(model, tok, text, seqlen=32, max_windows=0)


def test_context_length_reads_either_attribute():
    assert context_length(GPT2Config(n_positions=77)) == 77
    assert context_length(LlamaConfig(max_position_embeddings=99)) == 99
    assert context_length(PretrainedConfig()) is None
