"""Encoders judged as users use them: embedding fidelity against the original (clover.fidelity, `eval --compare`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA, INIT, VOCAB, _build
from tiny_tokenizer import tiny_tokenizer
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from clover.cli import app
from clover.fidelity import embedding_fidelity, held_out_texts, spearman

runner = CliRunner()


def test_spearman_is_a_rank_correlation():
    x = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert spearman(x, x) == pytest.approx(1.0, rel=1e-12)
    assert spearman(x, x.exp() * 3 + 1) == pytest.approx(1.0, rel=1e-12)  # monotonic: same ranks
    assert spearman(x, -x) == pytest.approx(-1.0, rel=1e-12)
    y = torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(spearman(x, y)) < 0.3


def test_held_out_texts_skip_headings_and_blank_rows():
    rows = ["", " = Heading = ", " a sentence long enough to count as prose for the test here . ", "short",
            " another sentence that is long enough to be embedded as one text . "]
    assert held_out_texts(rows, 10) == [rows[2].strip(), rows[4].strip()]


def _encoder():
    return _build(BertModel, BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=VOCAB + 200, max_position_embeddings=128,
                                        initializer_range=INIT, pad_token_id=0))


def test_a_model_is_perfectly_faithful_to_itself():
    model, tokenizer = _encoder(), tiny_tokenizer(vocab_size=VOCAB + 200)
    texts = [f"text number {i} about something else entirely {i * 7}" for i in range(12)]
    result = embedding_fidelity(model, model, tokenizer, texts, max_length=32)
    assert result.mean_cosine == pytest.approx(1.0, rel=1e-9) and result.similarity_spearman == pytest.approx(1.0)
    assert result.texts == 12


@pytest.mark.skipif(not DATA, reason="WikiText-2 not found (set CLOVER_DATA)")
def test_cli_compare_orthogonalized_and_pruned_encoders(tmp_path):
    base = tmp_path / "base"
    _encoder().save_pretrained(base)
    tiny_tokenizer(vocab_size=VOCAB + 200).save_pretrained(base)

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    run("orthogonalize", base, "--out", tmp_path / "orth")
    run("prune", base, "--out", tmp_path / "pruned", "--criterion", "clover", "--qk-ratio", 0.5, "--vo-ratio", 0.5)
    out = run("eval", tmp_path / "orth", "--compare", base, "--max-texts", 24, "--text-tokens", 48,
              "--json", tmp_path / "orth.json")
    assert "Spearman" in out
    orth = json.loads((tmp_path / "orth.json").read_text())
    assert orth["texts"] == 24 and orth["mean_cosine"] > 1 - 1e-6 and orth["similarity_spearman"] > 1 - 1e-6
    run("eval", tmp_path / "pruned", "--compare", base, "--max-texts", 24, "--text-tokens", 48,
        "--json", tmp_path / "pruned.json")
    pruned = json.loads((tmp_path / "pruned.json").read_text())
    assert pruned["mean_cosine"] < orth["mean_cosine"] and -1 <= pruned["similarity_spearman"] <= 1
