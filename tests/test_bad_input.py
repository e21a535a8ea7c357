"""Bad input, one case per subcommand and class of mistake: exit code 2, one error line on stderr naming the problem (and
the flag as typed), no traceback, and nothing written anywhere: not the output, not a temp file, not a checkpoint
folder, and the model folder untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import DATA, tiny_bert, tiny_llama
from test_whisper import tiny_whisper
from tiny_tokenizer import tiny_tokenizer
from typer.testing import CliRunner

import clover  # noqa: F401
from clover.cli import app

runner = CliRunner()
needs_data = pytest.mark.skipif(not DATA, reason="WikiText-2 not found (set CLOVER_DATA)")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer()
    paths = {}
    for name, model in {"llama": tiny_llama(vocab_size=300), "bert": tiny_bert(vocab_size=300),
                        "whisper": tiny_whisper()}.items():
        model.save_pretrained(root / name)
        if name != "whisper":
            tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    broken = tiny_llama(vocab_size=300)
    with torch.no_grad():
        broken.model.layers[1].self_attn.v_proj.weight[3, 5] = float("nan")
    broken.save_pretrained(root / "nan")
    tokenizer.save_pretrained(root / "nan")
    paths["nan"] = root / "nan"
    decomposed = root / "decomposed"  # the layout `finetune --init-only` writes (config + clover_tune.json)
    decomposed.mkdir()
    (decomposed / "config.json").write_text((root / "llama" / "config.json").read_text())
    (decomposed / "clover_tune.json").write_text("{}")
    paths["decomposed"] = decomposed
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "binary.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')
    (root / "folder").mkdir()
    (root / "a-file").write_text("x")
    paths["root"] = root
    return paths


def tree(*folders: Path) -> set[str]:
    """Every path below the folders, so that any file written (or deleted) shows."""
    return {os.path.join(d, f) for folder in folders for d, dirs, files in os.walk(folder) for f in dirs + files}


# (id, command with {llama} {bert} {whisper} {nan} {root} {tmp} placeholders, text the one line must hold)
CASES = [
    # inspect
    ("inspect-missing-model", ["inspect", "{tmp}/nope"], "does not exist"),
    ("inspect-plot-extension", ["inspect", "{llama}", "--plot", "{tmp}/s.xyz"], "--plot"),
    ("inspect-json-is-folder", ["inspect", "{llama}", "--json", "{root}/folder"], "is a folder"),
    ("inspect-json-under-file", ["inspect", "{llama}", "--json", "{root}/a-file/r.json"], "is a file"),
    ("inspect-nan-weights", ["inspect", "{nan}"], "non-finite weights in layer 1"),
    # orthogonalize
    ("orth-out-is-model", ["orthogonalize", "{llama}", "--out", "{llama}", "--overwrite"], "model folder"),
    ("orth-out-inside-model", ["orthogonalize", "{llama}", "--out", "{llama}/sub"], "inside it"),
    ("orth-out-holds-model", ["orthogonalize", "{llama}", "--out", "{root}", "--overwrite"], "holds the model"),
    ("orth-out-under-file", ["orthogonalize", "{llama}", "--out", "{root}/a-file/o"], "is a file"),
    ("orth-json-is-folder", ["orthogonalize", "{llama}", "--out", "{tmp}/o", "--json", "{root}/folder"], "folder"),
    ("orth-no-pairs", ["orthogonalize", "{llama}", "--out", "{tmp}/o", "--pairs", ","], "--pairs"),
    ("orth-nan-weights", ["orthogonalize", "{nan}", "--out", "{tmp}/o"], "non-finite weights in layer 1"),
    # eval
    ("eval-seqlen-beyond-context", ["eval", "{llama}", "--seqlen", 4096], "--seqlen 4096"),
    ("eval-masked-lm-perplexity", ["eval", "{bert}", "--seqlen", 32], "masked LM"),
    ("eval-speech-perplexity", ["eval", "{whisper}", "--seqlen", 32], "speech seq2seq"),
    ("eval-json-is-folder", ["eval", "{llama}", "--json", "{root}/folder"], "is a folder"),
    ("eval-compare-missing", ["eval", "{bert}", "--compare", "{tmp}/nope"], "does not exist"),
    ("eval-compare-one-text", ["eval", "{bert}", "--compare", "{bert}", "--max-texts", 1], "--max-texts"),
    # prune
    ("prune-ratio-range", ["prune", "{llama}", "--out", "{tmp}/p", "--vo-ratio", 1.5], "--vo-ratio 1.5"),
    ("prune-nothing", ["prune", "{llama}", "--out", "{tmp}/p"], "nothing to prune"),
    ("prune-ratio-and-threshold", ["prune", "{llama}", "--out", "{tmp}/p", "--vo-ratio", 0.5, "--vo-threshold", 1],
     "pass one of them"),
    ("prune-negative-threshold", ["prune", "{llama}", "--out", "{tmp}/p", "--vo-threshold", -1], "negative"),
    ("prune-threshold-too-high", ["prune", "{llama}", "--out", "{tmp}/p", "--criterion", "clover",
                                  "--vo-threshold", 1e9], "no dimensions"),
    ("prune-ratio-no-dims", ["prune", "{llama}", "--out", "{tmp}/p", "--criterion", "clover", "--vo-ratio", 0.99],
     "no dimensions"),
    ("prune-calib-seqlen", ["prune", "{llama}", "--out", "{tmp}/p", "--vo-ratio", 0.5, "--calib-seqlen", 4096],
     "--calib-seqlen 4096"),
    ("prune-eval-seqlen", ["prune", "{llama}", "--out", "{tmp}/p", "--vo-ratio", 0.5, "--criterion", "clover",
                           "--eval-ppl", "--seqlen", 4096], "--seqlen 4096"),
    ("prune-eval-masked-lm", ["prune", "{bert}", "--out", "{tmp}/p", "--vo-ratio", 0.5, "--criterion", "clover",
                              "--eval-ppl", "--seqlen", 32], "masked LM"),
    ("prune-out-inside-model", ["prune", "{llama}", "--out", "{llama}/p", "--vo-ratio", 0.5], "inside it"),
    ("prune-json-is-folder", ["prune", "{llama}", "--out", "{tmp}/p", "--vo-ratio", 0.5,
                              "--json", "{root}/folder"], "is a folder"),
    ("prune-decomposed-folder", ["prune", "{decomposed}", "--out", "{tmp}/p", "--vo-ratio", 0.5,
                                 "--criterion", "clover"], "decomposed CLOVER checkpoint"),
    ("prune-nan-weights", ["prune", "{nan}", "--out", "{tmp}/p", "--vo-ratio", 0.5, "--criterion", "clover"],
     "non-finite weights in layer 1"),
    # sweep
    ("sweep-ratios-not-numbers", ["sweep", "{llama}", "--ratios", "abc"], "'abc' is not a number"),
    ("sweep-ratio-zero", ["sweep", "{llama}", "--ratios", "0,0.5"], "prunes nothing"),
    ("sweep-ratio-range", ["sweep", "{llama}", "--ratios", "1.5"], "outside [0, 1)"),
    ("sweep-calib-seqlen", ["sweep", "{llama}", "--seqlen", 32, "--calib-seqlen", 4096], "--calib-seqlen 4096"),
    ("sweep-plot-extension", ["sweep", "{llama}", "--plot", "{tmp}/s.xyz"], "--plot"),
    ("sweep-masked-lm", ["sweep", "{bert}", "--seqlen", 32, "--criteria", "clover"], "masked LM"),
    # finetune
    ("tune-seqlen-beyond-context", ["finetune", "{llama}", "--data", "{tmp}/t.txt", "--seqlen", 4096,
                                    "--out", "{tmp}/f"], "--seqlen 4096"),
    ("tune-speech-model", ["finetune", "{whisper}", "--data", "{tmp}/t.txt", "--seqlen", 32, "--out", "{tmp}/f"],
     "speech seq2seq"),
    ("tune-masked-lm", ["finetune", "{bert}", "--data", "{tmp}/t.txt", "--seqlen", 32, "--out", "{tmp}/f"],
     "masked LM"),
    ("tune-binary-txt", ["finetune", "{llama}", "--data", "{root}/binary.txt", "--seqlen", 32, "--out", "{tmp}/f"],
     "not UTF-8"),
    ("tune-binary-jsonl", ["finetune", "{llama}", "--data", "{root}/binary.jsonl", "--seqlen", 32,
                           "--out", "{tmp}/f"], "not UTF-8"),
    ("tune-data-folder", ["finetune", "{llama}", "--data", "{root}/folder", "--seqlen", 32, "--out", "{tmp}/f"],
     "is a folder"),
    ("tune-out-is-model", ["finetune", "{llama}", "--data", "{tmp}/t.txt", "--out", "{llama}", "--overwrite"],
     "model folder"),
    ("tune-json-is-folder", ["finetune", "{llama}", "--data", "{tmp}/t.txt", "--out", "{tmp}/f",
                             "--json", "{root}/folder"], "is a folder"),
    ("tune-nan-weights", ["finetune", "{nan}", "--data", "{tmp}/t.txt", "--seqlen", 32, "--steps", 1,
                          "--out", "{tmp}/f"], "non-finite weights in layer 1"),
]
DATA_FREE = {"inspect", "orthogonalize", "finetune"}


@pytest.mark.parametrize("args, message", [pytest.param(a, m, id=i, marks=() if a[0] in DATA_FREE else needs_data)
                                           for i, a, m in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(models, tmp_path, args, message):
    work = tmp_path / "work"
    work.mkdir()
    (work / "t.txt").write_text("some training text for the tiny model " * 40)
    fill = {k: str(v) for k, v in models.items() if k != "root"} | {"root": str(models["root"]), "tmp": str(work)}
    argv = [a.format(**fill) if isinstance(a, str) else str(a) for a in args]
    before = tree(models["root"], work)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    # Progress bars (loading, spectra) may come first on stderr; the failure is one line, and the last.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert tree(models["root"], work) == before


def test_out_beside_a_model_file_is_allowed(tmp_path):
    """A .gguf model is one file: a sibling --out endangers nothing, an --out that holds the file does."""
    from clover.errors import CloverError
    from clover.preflight import check_out_dir

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    check_out_dir(tmp_path / "out", False, tmp_path / "m.gguf")
    with pytest.raises(CloverError, match="holds the model"):
        check_out_dir(tmp_path, True, tmp_path / "m.gguf")
