"""Checkpoints keep the head they were saved with: a sentence encoder's ``BertModel`` (with its pooler), a
classifier's ``score``, through load, orthogonalize, prune, save and reload; heads clover has no pruned runtime
for are refused before any weights load."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import INIT, VOCAB, _build
from tiny_tokenizer import tiny_tokenizer
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)
from typer.testing import CliRunner

import clover  # noqa: F401  (registers clover_* types)
from clover.cli import app
from clover.models import load

runner = CliRunner()
SMALL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
             max_position_embeddings=128, initializer_range=INIT, num_hidden_layers=2)


def bert_encoder():
    return _build(BertModel, BertConfig(**SMALL, pad_token_id=0))


def qwen2_classifier():
    return _build(Qwen2ForSequenceClassification, Qwen2Config(**SMALL, num_key_value_heads=2, num_labels=3,
                                                              pad_token_id=0))


def llama_classifier():
    return _build(LlamaForSequenceClassification, LlamaConfig(**SMALL, num_key_value_heads=2, num_labels=3,
                                                              pad_token_id=0))


def gpt2_classifier():
    return _build(GPT2ForSequenceClassification, GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                                            n_positions=128, num_labels=3, pad_token_id=0,
                                                            initializer_range=INIT))


HEADS = {"bert-base": (bert_encoder, AutoModel), "qwen2-classifier": (qwen2_classifier,
                                                                      AutoModelForSequenceClassification),
         "llama-classifier": (llama_classifier, AutoModelForSequenceClassification),
         "gpt2-classifier": (gpt2_classifier, AutoModelForSequenceClassification)}


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def outputs(model, ids):
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids))
    tensors = [out.logits] if getattr(out, "logits", None) is not None else [out.last_hidden_state,
                                                                             out.pooler_output]
    return torch.cat([t.flatten() for t in tensors]).float()


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=sorted(HEADS))
def saved(request, tmp_path):
    build, auto = HEADS[request.param]
    model = build()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer(vocab_size=VOCAB + 100).save_pretrained(tmp_path / "model")
    return request.param, model, auto, tmp_path


def test_loader_keeps_the_named_class(saved):
    name, model, _, tmp_path = saved
    loaded = load(str(tmp_path / "model")).model
    assert type(loaded) is type(model), name
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    assert relative(outputs(loaded, ids), outputs(model, ids)) == 0.0  # same weights, head and pooler included


def test_orthogonalize_and_prune_keep_the_head(saved):
    name, model, auto, tmp_path = saved
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    want = outputs(model, ids)
    code, out = run("orthogonalize", tmp_path / "model", "--out", tmp_path / "orth")
    assert code == 0, out
    orth = auto.from_pretrained(tmp_path / "orth")
    assert type(orth) is type(model)
    assert relative(outputs(orth, ids), want) <= 1e-4
    # A threshold of 0 keeps every direction with a non-zero singular value: exact, so a dropped or random head or
    # pooler would show. Then a real prune, reloaded with and without clover.
    code, out = run("prune", tmp_path / "model", "--out", tmp_path / "full", "--criterion", "clover",
                    "--vo-threshold", 0)
    assert code == 0, out
    full = auto.from_pretrained(tmp_path / "full")
    assert full.config.model_type.startswith("clover_") and type(full).__name__.startswith("Clover")
    assert relative(outputs(full, ids), want) <= 1e-4
    code, out = run("prune", tmp_path / "model", "--out", tmp_path / "half", "--criterion", "clover",
                    "--vo-ratio", 0.5, "--json", tmp_path / "half.json")
    assert code == 0, out
    report = json.loads((tmp_path / "half.json").read_text())
    assert report["params_after"] < report["params_before"]
    half = auto.from_pretrained(tmp_path / "half")
    remote = auto.from_pretrained(tmp_path / "half", trust_remote_code=True)
    assert relative(outputs(remote, ids), outputs(half, ids)) == 0.0
    assert relative(outputs(half, ids), want) > 1e-4  # really pruned


def test_eval_perplexity_refuses_non_causal_heads(saved):
    name, _, _, tmp_path = saved
    code, out = run("eval", tmp_path / "model", "--seqlen", 32, "--max-windows", 1)
    assert code == 2 and "needs a causal language model" in out and "Traceback" not in out, out
    (tmp_path / "train.txt").write_text("some training text " * 50)
    code, out = run("finetune", tmp_path / "model", "--data", tmp_path / "train.txt", "--steps", 1,
                    "--out", tmp_path / "tuned")
    assert code == 2 and "needs a causal language model" in out, out
    assert not (tmp_path / "tuned").exists() and not (tmp_path / "tuned.checkpoints").exists()


def test_unsupported_head_is_refused_before_weights_load(tmp_path):
    model = _build(LlamaForTokenClassification, LlamaConfig(**SMALL, num_key_value_heads=2, num_labels=5))
    model.save_pretrained(tmp_path / "tagger")
    # Orthogonalize rewrites attention only and keeps any head.
    code, out = run("orthogonalize", tmp_path / "tagger", "--out", tmp_path / "orth")
    assert code == 0, out
    assert json.loads((tmp_path / "orth" / "config.json").read_text())["architectures"] == [
        "LlamaForTokenClassification"]
    # Pruning has no runtime for it: refused from config.json alone (broken weights prove none were read).
    weights = tmp_path / "tagger" / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    code, out = run("prune", tmp_path / "tagger", "--out", tmp_path / "p", "--vo-ratio", 0.5, "--criterion", "clover")
    assert code == 2 and "LlamaForTokenClassification is not supported" in out and "sequence classification" in out
    assert not (tmp_path / "p").exists()
    assert sorted(os.listdir(tmp_path)) == ["orth", "tagger"]
