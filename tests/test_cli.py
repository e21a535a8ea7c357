"""The ``clover`` command end to end on a tiny saved LLaMA with a real (tiny) tokenizer."""

import json
import os

import pytest
import torch
from conftest import DATA, tiny_llama
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import clover  # noqa: F401
from clover.cli import app
from clover.save import atomic_dir

needs_data = pytest.mark.skipif(not DATA, reason="WikiText-2 not found (set CLOVER_DATA)")
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    model = tiny_llama(vocab_size=300, max_position_embeddings=256)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_inspect_prints_table_plot_and_json(model_dir, tmp_path):
    code, out = run("inspect", model_dir, "--plot", tmp_path / "s.png", "--json", tmp_path / "s.json")
    assert code == 0, out
    assert "V-O 90%" in out and "rotary" in out
    assert (tmp_path / "s.png").stat().st_size > 1000
    pairs = json.loads((tmp_path / "s.json").read_text())["pairs"]
    assert {p["kind"] for p in pairs} == {"qk", "vo"} and all("rank_90" in p for p in pairs)


def test_orthogonalize_proves_and_saves(model_dir, tmp_path):
    out_dir = tmp_path / "orth"
    code, out = run("orthogonalize", model_dir, "--out", out_dir, "--json", tmp_path / "r.json")
    assert code == 0, out
    assert "PASSED" in out and "rotary" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["check"]["passed"] and report["check"]["relative_diff"] <= 1e-4
    x = torch.randint(0, 300, (1, 16))
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rewritten = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        a, b = original(x).logits, rewritten(x).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert (out_dir / "tokenizer.json").exists() and (out_dir / "clover_report.json").exists()


def test_existing_output_is_refused_without_overwrite(model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, out = run("orthogonalize", model_dir, "--out", tmp_path / "taken")
    assert code == 2 and "--overwrite" in out
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]
    code, out = run("orthogonalize", model_dir, "--out", tmp_path / "taken", "--overwrite")
    assert code == 0, out
    assert (tmp_path / "taken" / "config.json").exists() and not (tmp_path / "taken" / "keep.txt").exists()


@needs_data
def test_eval_reports_windows_and_tokens(model_dir, tmp_path):
    code, out = run("eval", model_dir, "--seqlen", 64, "--max-windows", 2, "--json", tmp_path / "e.json")
    assert code == 0, out
    result = json.loads((tmp_path / "e.json").read_text())
    assert (result["windows"], result["tokens"]) == (2, 126) and result["ppl"] > 1
    assert "2 windows x 64 tokens" in " ".join(out.split())


@needs_data
def test_prune_end_to_end(model_dir, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out = run("prune", model_dir, "--out", out_dir, "--qk-ratio", 0.5, "--vo-ratio", 0.5,
                    "--criterion", "whitened", "--qk-criterion", "rotary-activation", "--calib-samples", 2,
                    "--calib-seqlen", 32, "--eval-ppl", "--seqlen", 64, "--max-windows", 2,
                    "--json", tmp_path / "p.json")
    assert code == 0, out
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["kv_bytes_per_token_after"] * 2 == report["kv_bytes_per_token_before"]
    assert report["params_after"] < report["params_before"]
    assert {"ppl_before", "ppl_after"} <= set(report) and [lr["vo_dim"] for lr in report["layers"]] == [8, 8]
    assert "not a CLOVER rewrite" in out
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert loaded.config.model_type == "clover_llama" and loaded.config.vo_dims == [8, 8]


@needs_data
@pytest.mark.parametrize("args, message", [
    (["--vo-ratio", 1.5], "outside"),
    (["--qk-ratio", 0.5, "--calib-seqlen", 32], "rotary-weight or rotary-activation"),
    (["--vo-ratio", 0.5, "--calib-samples", 100000], "tokens"),
    (["--vo-ratio", 0.5, "--calib-seqlen", 32, "--calib", "/no/such/corpus"], "/no/such/corpus"),
    (["--vo-ratio", 0.5, "--sequential", "--allocation", "global", "--calib-samples", 2, "--calib-seqlen", 32],
     "--allocation uniform"),
])
def test_prune_errors_leave_nothing_behind(model_dir, tmp_path, args, message):
    code, out = run("prune", model_dir, "--out", tmp_path / "p", *args)
    assert code == 2, out
    assert message in " ".join(out.split())
    assert os.listdir(tmp_path) == []


@needs_data
def test_sweep_table_plot_json(model_dir, tmp_path):
    code, out = run("sweep", model_dir, "--pair", "vo", "--ratios", "0.25,0.5", "--criteria", "vanilla,clover",
                    "--seqlen", 64, "--max-windows", 2, "--plot", tmp_path / "s.png", "--json", tmp_path / "s.json")
    assert code == 0, out
    result = json.loads((tmp_path / "s.json").read_text())
    assert set(result["ppl"]) == {"vanilla", "clover"} and set(result["ppl"]["clover"]) == {"0.25", "0.5"}
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["eval", "{model}", "--seqlen", 100000], "--seqlen"),
    (["eval", "{model}", "--seqlen", 64, "--data", "/no/such/dir"], "/no/such/dir"),
    (["inspect", "/no/such/model"], "/no/such/model"),
    (["orthogonalize", "{model}", "--out", "{tmp}/o", "--pairs", "qk,xy"], "unknown pair"),
])
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, args, message):
    args = [a.format(model=model_dir, tmp=tmp_path) if isinstance(a, str) else a for a in args]
    code, out = run(*args)
    assert code == 2, out
    assert message in out and "Traceback" not in out
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_lists_families(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=64)).save_pretrained(tmp_path / "neox")
    code, out = run("orthogonalize", tmp_path / "neox", "--out", tmp_path / "o")
    assert code == 2 and "gpt_neox" in out and "llama" in out
    assert not (tmp_path / "o").exists()


def test_failure_inside_atomic_dir_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
