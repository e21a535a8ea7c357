"""Streaming conversion of sharded safetensors checkpoints: equal to in-memory, bounded memory, resumable, and
clear about broken input (the output folder is then complete or absent)."""

import errno
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_qwen2
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import clover  # noqa: F401  (registers clover_llama)
from clover.cli import app
from clover.errors import CloverError
from clover.models import load
from clover.orthogonalize import OrthogonalizeConfig, orthogonalize_
from clover.prune import PruneConfig, prune
from clover.save import save_model
from clover.streaming import StreamOptions, stream_orthogonalize, stream_prune
from clover.streaming import workdir as workdir_module

QUIET = StreamOptions(progress=False)
CALIB = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    left, right = _tensors(a), _tensors(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype and torch.equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A 3-layer GQA LLaMA with biases, saved in many small shards."""
    folder = tmp_path_factory.mktemp("sharded") / "llama"
    tiny_llama(num_hidden_layers=3, attention_bias=True).save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) >= 4
    return folder


def _in_memory_orthogonalized(source: Path, out: Path) -> None:
    lm = load(str(source))
    orthogonalize_(lm.model, OrthogonalizeConfig(progress=False))
    save_model(lm.model, None, out)


def _in_memory_pruned(source: Path, out: Path, config: PruneConfig):
    lm = load(str(source))
    pruned, report = prune(lm.model, config)
    save_model(pruned, None, out)
    return report


def test_orthogonalize_streamed_equals_in_memory_bit_for_bit(sharded, tmp_path):
    report = stream_orthogonalize(sharded, tmp_path / "streamed", options=QUIET)
    _in_memory_orthogonalized(sharded, tmp_path / "memory")
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    assert {(p["kind"], p["status"]) for p in report["pairs"]} == {("qk", "skipped"), ("vo", "rewritten")}
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(sharded))
    assert not (tmp_path / "streamed.partial").exists()


def test_llama_without_biases(tmp_path):
    """Without a bias column the factors are views of the weights: the check must keep the originals."""
    tiny_llama(num_hidden_layers=2, attention_bias=False).save_pretrained(tmp_path / "src", max_shard_size="60KB")
    stream_orthogonalize(tmp_path / "src", tmp_path / "streamed", options=QUIET)
    _in_memory_orthogonalized(tmp_path / "src", tmp_path / "memory")
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")


def test_gpt2_orthogonalize_streams_and_prune_refuses_clearly(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "src", max_shard_size="60KB")
    stream_orthogonalize(tmp_path / "src", tmp_path / "streamed", options=QUIET)
    _in_memory_orthogonalized(tmp_path / "src", tmp_path / "memory")
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    with pytest.raises(CloverError, match="supports the LLaMA family.*--no-stream"):
        stream_prune(tmp_path / "src", tmp_path / "p", PruneConfig(vo_ratio=0.5, criterion="clover"), QUIET)
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


def test_qwen2_family_streams_too(tmp_path):
    tiny_qwen2().save_pretrained(tmp_path / "src", max_shard_size="60KB")
    stream_orthogonalize(tmp_path / "src", tmp_path / "streamed", options=QUIET)
    _in_memory_orthogonalized(tmp_path / "src", tmp_path / "memory")
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")


@pytest.mark.parametrize("criterion,qk_criterion,allocation", [
    ("clover", "rotary-weight", "uniform"),
    ("whitened", "rotary-activation", "uniform"),
    ("whitened", "rotary-activation", "global"),
])
def test_prune_streamed_equals_in_memory_and_loads(sharded, tmp_path, criterion, qk_criterion, allocation):
    config = PruneConfig(qk_ratio=0.5, vo_ratio=0.25, criterion=criterion, qk_criterion=qk_criterion,
                         allocation=allocation, calibration=CALIB, progress=False, vo_whitening="mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = stream_prune(sharded, tmp_path / "streamed", config, QUIET)
        in_memory = _in_memory_pruned(sharded, tmp_path / "memory", config)
    assert streamed.to_dict() == in_memory.to_dict()
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "memory")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    saved = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert saved["model_type"] == "clover_llama" and "auto_map" in saved
    assert (tmp_path / "streamed" / "clover_llama.py").is_file()


def test_interrupted_run_resumes_from_the_last_finished_layer(sharded, tmp_path):
    config = PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=CALIB, progress=False)
    out = tmp_path / "out"

    def stop_after_first(index):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_prune(sharded, out, config, StreamOptions(progress=False, on_block_done=stop_after_first))
    assert not out.exists() and (tmp_path / "out.partial" / "progress.json").is_file()
    finished = []
    stream_prune(sharded, out, config, StreamOptions(progress=False, on_block_done=finished.append))
    assert finished == [1, 2]  # layer 0 was not redone
    stream_prune(sharded, tmp_path / "whole", config, QUIET)
    _assert_same_tensors(out, tmp_path / "whole")
    assert not (tmp_path / "out.partial").exists()


def test_full_disk_is_a_clear_error_and_the_rerun_resumes(sharded, tmp_path, monkeypatch):
    real_save, calls = workdir_module.save_file, []

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(workdir_module, "save_file", fills_up)
    with pytest.raises(CloverError, match="no space left on the device.*rerun the same command"):
        stream_orthogonalize(sharded, tmp_path / "out", options=QUIET)
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "out.partial").glob(".*.tmp"))  # no half-written file left behind
    monkeypatch.setattr(workdir_module, "save_file", real_save)
    stream_orthogonalize(sharded, tmp_path / "out", options=QUIET)
    stream_orthogonalize(sharded, tmp_path / "whole", options=QUIET)
    _assert_same_tensors(tmp_path / "out", tmp_path / "whole")


def test_other_settings_do_not_resume_someone_elses_partial_run(sharded, tmp_path):
    def stop(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_orthogonalize(sharded, tmp_path / "out", options=StreamOptions(progress=False, on_block_done=stop))
    with pytest.raises(CloverError, match="other settings"):
        stream_orthogonalize(sharded, tmp_path / "out", OrthogonalizeConfig(compute_dtype=torch.float32), QUIET)
    assert not (tmp_path / "out").exists()


def _copy(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in source.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_missing_shard(sharded, tmp_path):
    broken = _copy(sharded, tmp_path / "broken")
    sorted(broken.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(CloverError, match="is missing: copy every shard"):
        stream_orthogonalize(broken, tmp_path / "out", options=QUIET)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_index_naming_tensors_that_are_not_there(sharded, tmp_path):
    broken = _copy(sharded, tmp_path / "broken")
    index_file = broken / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.extra"] = index["weight_map"]["model.norm.weight"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CloverError, match="does not: the index and the shards come from different saves"):
        stream_orthogonalize(broken, tmp_path / "out", options=QUIET)
    assert not (tmp_path / "out").exists()


def test_attention_tensor_in_a_non_float_dtype(sharded, tmp_path):
    broken = _copy(sharded, tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.v_proj.weight"
    shard = broken / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CloverError, match="stored as I8, not a float dtype.*dequantize"):
        stream_orthogonalize(broken, tmp_path / "out", options=QUIET)
    assert not (tmp_path / "out").exists()


def test_cli_streams_sharded_folders_and_reports_bad_input(sharded, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["orthogonalize", str(sharded), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "streamed layer by layer" in result.output
    assert json.loads((tmp_path / "o" / "clover_report.json").read_text())["streamed"] is True
    result = runner.invoke(app, ["prune", str(sharded), "--out", str(tmp_path / "p"), "--vo-ratio", "0.5",
                                 "--criterion", "clover", "--eval-ppl"])
    assert result.exit_code == 2 and "--no-stream" in result.output
    result = runner.invoke(app, ["prune", str(sharded), "--out", str(tmp_path / "p"), "--vo-ratio", "0.5",
                                 "--criterion", "clover"])
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.vo_dims == [8, 8, 8]


# --- the scale: a sharded checkpoint of several hundred MB ---------------------------------------------

BIG = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
           intermediate_size=2048, vocab_size=8192, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture
def one_thread():
    """On a loaded 2-core machine two BLAS threads make float64 QR ~50x slower; equality holds at any count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**BIG)).save_pretrained(folder, max_shard_size="80MB")
    return folder


def _checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_big_sharded_checkpoint_streams_equal_to_in_memory(big_checkpoint, tmp_path, one_thread):
    assert len(list(big_checkpoint.glob("*.safetensors"))) >= 4 and _checkpoint_bytes(big_checkpoint) > 300e6
    calibration = torch.randint(0, BIG["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(vo_ratio=0.5, qk_ratio=0.25, criterion="whitened", qk_criterion="rotary-activation",
                         calibration=calibration, progress=False)
    stream_prune(big_checkpoint, tmp_path / "streamed", config, QUIET)
    _in_memory_pruned(big_checkpoint, tmp_path / "memory", config)
    _assert_same_tensors(tmp_path / "streamed", tmp_path / "memory")


PEAK_SCRIPT = """
import sys, torch, transformers, clover
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from clover.prune import PruneConfig
from clover.streaming import StreamOptions, stream_prune
torch.set_num_threads(1)
calibration = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
config = PruneConfig(vo_ratio=0.5, criterion="whitened", calibration=calibration, progress=False)
# Warm-up on a tiny checkpoint: lazy imports and allocator state are a fixed cost, not the checkpoint's.
tiny = Path(sys.argv[2]) / "tiny"
LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             vocab_size=128)).save_pretrained(tiny)
stream_prune(tiny, Path(sys.argv[2]) / "tiny-out", config, StreamOptions(progress=False))
def status(key):  # kB in /proc/self/status; ru_maxrss would carry over the parent's peak through fork
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
base = status("VmRSS:")
stream_prune(sys.argv[1], Path(sys.argv[2]) / "out", config, StreamOptions(progress=False))
print(base, status("VmHWM:"))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc")
def test_streamed_peak_memory_is_well_below_the_checkpoint(big_checkpoint, tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(big_checkpoint), str(tmp_path)],
                          capture_output=True, text=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    base, peak = map(int, done.stdout.split()[-2:])
    size = _checkpoint_bytes(big_checkpoint)
    print(f"streamed prune: RSS +{(peak - base) / 2**20:.0f} MiB over the warmed-up baseline, checkpoint "
          f"{size / 2**20:.0f} MiB")
    assert peak - base < 0.5 * size, f"streaming grew RSS by {(peak - base) / 2**20:.0f} MiB for a " \
                                     f"{size / 2**20:.0f} MiB checkpoint"


def test_streamed_prune_uses_mixed_where_auto_would_choose_and_says_so(sharded, tmp_path):
    config = PruneConfig(vo_ratio=0.25, criterion="whitened", qk_criterion="rotary-activation", calibration=CALIB,
                         progress=False)  # vo_whitening="auto", the default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = stream_prune(sharded, tmp_path / "streamed", config, QUIET)
    assert report.vo_whitening == "mixed+refit"
    assert any("streamed with mixed" in n for n in report.notes)
