"""Refusals that need only config.json and the arguments come before any weights load, and outputs are safe.

Timing-free evidence: the model folder's weight file is not a safetensors file at all, so a command that opened
the weights would fail with "could not be loaded"; every case below must instead name the real problem.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_gpt2, tiny_llama
from tiny_tokenizer import tiny_tokenizer
from typer.testing import CliRunner

import clover  # noqa: F401
from clover.cli import app
from clover.errors import CloverError
from clover.output import atomic_dir, check_output_dir, claim, release
from clover.prune import PruneConfig, prune

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory) -> Path:
    """A tiny LLaMA folder (context 128, 4 heads of 16, 2 KV heads) whose weights cannot be read."""
    folder = tmp_path_factory.mktemp("unreadable") / "llama"
    tiny_llama(vocab_size=300).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file")
    return folder


def run(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


# (verb and arguments, text the one line must hold); {m} is the model folder, {t} a fresh output folder
CASES = [
    (["inspect", "{m}", "--plot", "{t}.xyz"], "unknown extension"),
    (["orthogonalize", "{m}", "--out", "{t}", "--pairs", "xx"], "unknown pair kind"),
    (["eval", "{m}", "--seqlen", "4096"], "beyond the model's context of 128"),
    (["prune", "{m}", "--out", "{t}", "--vo-ratio", "0.99"], "--vo-ratio 0.99 would leave a head with no dim"),
    (["prune", "{m}", "--out", "{t}", "--qk-ratio", "0.99", "--criterion", "clover", "--allocation", "global"],
     "--qk-ratio 0.99 would leave a layer with no dim"),
    (["prune", "{m}", "--out", "{t}", "--vo-ratio", "0.5", "--calib-seqlen", "4096"], "--calib-seqlen 4096 is beyond"),
    (["latent", "{m}", "--out", "{t}", "--kv-ratio", "0.999"], "--kv-ratio 0.999 leaves 0 cached dims"),
    (["latent", "{m}", "--out", "{t}", "--kv-ratio", "0.99", "--allocation", "uniform"], "leaves layer 0"),
    (["latent", "{m}", "--out", "{t}", "--k-dims", "64", "--v-dims", "8"], "at most 32 key"),
    (["slice", "{m}", "--out", "{t}", "--ratio", "0.99"], "--ratio 0.99 leaves 0.6 of 64 hidden dims"),
    (["sweep", "{m}", "--ratios", "0.99", "--seqlen", "64"], "--ratios entry 0.99 would leave a head"),
    (["finetune", "{m}", "--out", "{t}", "--data", "{d}", "--steps", "0"], "--steps 0 must be at least 1"),
    (["finetune", "{m}", "--out", "{t}", "--data", "{d}", "--seqlen", "4096"], "--seqlen 4096 is beyond"),
    (["prune", "{m}", "--out", "{t}", "--vo-ratio", "0.5", "--calib", "{t}-nothing"], "--calib"),
    (["mla", "{m}", "--out", "{t}", "--kv-ratio", "0.9"], "no more than the shared rotated key"),
    (["mla", "{m}", "--out", "{t}", "--layout", "gqa", "--kv-heads", "3"], "must divide the model's 2 KV heads"),
    (["mla", "{m}", "--out", "{t}", "--kv-ratio", "0.5", "--preset", "vllm"], "320 or 576"),
    (["export", "{m}", "--gguf", "{t}.gguf", "--type", "q4"], "unsupported GGUF type"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_refusal_comes_before_the_weights_are_opened(unreadable, tmp_path, args, message):
    (tmp_path / "train.txt").write_text("some training text\n" * 20)
    argv = [a.format(m=unreadable, t=tmp_path / "out", d=tmp_path / "train.txt") for a in args]
    code, out = run(*argv)
    assert code == 2, out
    assert "could not be loaded" not in out and message in out, out
    assert not (tmp_path / "out").exists()
    assert not list(unreadable.parent.glob(".*lock")), "a refused run leaves no lock behind"


def test_the_same_arguments_do_open_the_weights_when_they_are_fine(unreadable, tmp_path):
    """The control: with valid settings the command gets as far as the weights, and says they are broken."""
    code, out = run("prune", unreadable, "--out", tmp_path / "out", "--vo-ratio", "0.5", "--criterion", "clover")
    assert code == 2 and "could not be loaded" in out


def test_a_missing_config_field_is_named(tmp_path):
    folder = tmp_path / "nokv"
    tiny_llama(vocab_size=300).save_pretrained(folder)  # 2 KV heads; without the field transformers assumes 4
    config = json.loads((folder / "config.json").read_text())
    del config["num_key_value_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    code, out = run("inspect", folder)
    assert code == 2 and "config.json lacks num_key_value_heads" in out and "ignore_mismatched" not in out, out


# --- output safety -----------------------------------------------------------------------------------------------

def test_the_working_folder_is_never_an_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), ".."):
        code, text = run("orthogonalize", "no-such-model", "--out", out, "--overwrite")
        assert code == 2 and "working folder" in text, text
    assert sorted(os.listdir(tmp_path)) == []


def test_a_second_writer_is_refused_and_the_first_one_wins(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from clover.output import check_output_dir
        check_output_dir({str(out)!r}, overwrite=True)
        print("claimed", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(CloverError, match="another clover run is writing"):
            check_output_dir(out, overwrite=True)
        with pytest.raises(CloverError, match="another clover run is writing"):
            with atomic_dir(out, overwrite=True):
                pass
    finally:
        holder.kill()
        holder.wait()
    with atomic_dir(out) as tmp:  # the holder is gone: its lock went with it
        (tmp / "x").write_text("mine")
    assert (out / "x").read_text() == "mine"
    with pytest.raises(CloverError, match="exists"):
        check_output_dir(out, overwrite=False)


def test_an_output_created_while_working_is_not_replaced_silently(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CloverError, match="appeared while this run worked"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("1")
            out.mkdir()  # another program (one that takes no claim) made it meanwhile
    assert list(out.iterdir()) == [] and not list(tmp_path.glob(".out.partial-*"))


def test_sigterm_while_saving_leaves_no_partial_folder(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time
        from clover.output import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "half").write_text("x")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert list(tmp_path.glob(".out.partial-*"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == []


def test_a_partial_folder_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}-abc"
    stale.mkdir()
    (stale / "weights").write_text("half")
    alive = tmp_path / f".out.partial-{os.getppid()}-abc"  # a running process's partial is not touched
    alive.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("done")
    assert not stale.exists() and alive.exists() and (tmp_path / "out" / "x").is_file()


@pytest.mark.parametrize("umask,folder,file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, folder, file):
    from clover.save import save_model, write_json

    old = os.umask(umask)
    try:
        model = tiny_llama(vocab_size=300)
        save_model(model, tiny_tokenizer(), tmp_path / "out", report={"a": 1})
        write_json(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == folder
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == file, path
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == file


def test_claims_are_reentrant_and_released(tmp_path):
    out = tmp_path / "out"
    claim(out)
    claim(out)
    assert (tmp_path / ".out.lock").exists()
    release(out)
    assert not (tmp_path / ".out.lock").exists()


def test_a_pruned_output_s_tokenizer_loads_without_clover_and_without_a_prompt(tmp_path):
    """The README's line for loading the tokenizer where clover is not installed: no remote code, no question."""
    from clover.save import save_model

    pruned, _ = prune(tiny_llama(vocab_size=300), PruneConfig(vo_ratio=0.5, criterion="clover", progress=False))
    save_model(pruned, tiny_tokenizer(), tmp_path / "out")
    readme = (ROOT / "README.md").read_text()
    line = 'AutoTokenizer.from_pretrained(folder, trust_remote_code=False)'
    assert line in readme
    code = textwrap.dedent(f"""
        import sys
        sys.modules["clover"] = None  # this process cannot import clover
        from transformers import AutoTokenizer
        folder = {str(tmp_path / 'out')!r}
        tokenizer = {line}
        print(tokenizer("hello world").input_ids)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "custom code" not in done.stdout + done.stderr
    assert done.stdout.strip() == str(tiny_tokenizer()("hello world").input_ids)


# --- reports that say what happened ------------------------------------------------------------------------------

def test_a_latent_output_larger_than_its_input_is_reported():
    import torch

    from clover.latent import LatentConfig, to_latent

    model = tiny_gpt2()
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    _, report = to_latent(model, LatentConfig(kv_ratio=0.0, calibration=ids, split=1.0, progress=False))
    assert report.params_after > report.params_before
    assert any("more parameters than the input" in w for w in report.warnings), report.warnings


def test_threshold_prune_reports_directions_kept_below_the_threshold():
    import torch

    model = tiny_gpt2()  # four heads per block: their counts above the threshold differ
    config = PruneConfig(vo_threshold=0.0, criterion="clover", progress=False)
    _, full = prune(model, config)
    assert all(lr.vo_below_threshold == 0 for lr in full.layers)  # nothing is below 0
    scores = []
    from clover.adapters import adapter_for
    from clover.criteria import candidate

    adapter = adapter_for(model)
    for site in adapter.sites(model):
        scores.append(candidate(adapter.read(site), "vo", "clover", rotary=False, name=site.name).scores.sqrt())
    threshold = float(torch.cat([s.flatten() for s in scores]).median())
    _, report = prune(model, PruneConfig(vo_threshold=threshold, criterion="clover", progress=False))
    for lr, s in zip(report.layers, scores, strict=True):
        above = (s > threshold).sum(dim=-1)
        assert lr.vo_dim == int(above.max())
        assert lr.vo_below_threshold == int((lr.vo_dim - above).sum())
    assert sum(lr.vo_below_threshold for lr in report.layers) > 0
    note = next(n for n in report.notes if n.startswith("--vo-threshold"))
    assert f"{sum(lr.vo_below_threshold for lr in report.layers)} V-O directions" in note


def test_finetune_says_what_its_checkpoints_cost_and_drops_them_when_asked(tmp_path):
    model = tmp_path / "llama"
    tiny_llama(vocab_size=300).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    base = ["finetune", model, "--data", tmp_path / "train.txt", "--steps", "2", "--save-steps", "1",
            "--seqlen", "16", "--batch-size", "2"]
    code, out = run(*base, "--out", tmp_path / "kept")
    assert code == 0, out
    assert "checkpoints kept in" in out and "GiB" in out and (tmp_path / "kept.checkpoints").is_dir()
    code, out = run(*base, "--out", tmp_path / "dropped", "--drop-checkpoints")
    assert code == 0, out
    assert "checkpoints deleted" in out and not (tmp_path / "dropped.checkpoints").exists()
    assert (tmp_path / "dropped" / "config.json").is_file()
