"""CLOVER fine-tuning: exact at step 0, trainable, merged back into plain weights that load with stock loaders."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import TINY_MODELS, tiny_gpt2, tiny_llama
from tiny_tokenizer import SAMPLE_TEXT, tiny_tokenizer
from transformers import AutoModelForCausalLM

from clover.adapters import adapter_for
from clover.errors import CloverError
from clover.finetune import (
    TuneConfig,
    attach,
    clover_parameter_count,
    load_decomposed,
    lora_parameter_count,
    match_lora,
    merge_,
    save_decomposed,
    target_modules,
    trainable_parameters,
)
from clover.finetune.data import load_texts, token_windows
from clover.pairs import factors
from clover.finetune.train import COMMIT_MARKER, FinetuneConfig, prepare, train
from clover.verify import model_outputs

VALID_TARGETS = {"gpt2": ("qk", "k", "vo", "up"), "bert": ("qk", "k", "vo", "up")}
ROTARY_TARGETS = ("k", "vo", "up")


def _steps(model, inputs, n=2, lr=5e-2):
    """A few SGD steps on the LM loss (masked-LM models: predict the input ids), so cores move away from init."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(n):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_target_is_exact_at_step_zero(name):
    for target in VALID_TARGETS.get(name, ROTARY_TARGETS):
        model = TINY_MODELS[name]()
        inputs = adapter_for(model).example_inputs(model)
        before = model_outputs(model, inputs)
        report = attach(model, TuneConfig(targets=(target,), progress=False))
        assert report.check.passed, (name, target, report.check)
        assert torch.allclose(model_outputs(model, inputs), before, atol=1e-4 * before.abs().max().item())
        assert 0 < report.trainable_parameters == trainable_parameters(model)
        assert report.trainable_parameters == clover_parameter_count(TINY_MODELS[name](), (target,))


def test_tune_then_merge_keeps_shapes_names_and_logits(tiny_model):
    name, model = tiny_model
    inputs = adapter_for(model).example_inputs(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    original = model_outputs(model, inputs)
    attach(model, TuneConfig(dropout=0.1, train_bias=True, progress=False))
    _steps(model, inputs)
    tuned = model_outputs(model, inputs)
    assert (tuned - original).abs().max() > 1e-3, "training did not change the model"
    check = merge_(model)
    assert check.passed
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert torch.allclose(model_outputs(model, inputs), tuned, atol=1e-5 * tuned.abs().max().item())
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored


def test_update_is_full_rank():
    """The point of CLOVER: a d x d core gives a full-rank change of the V-O product, unlike a rank-r adapter."""
    model = tiny_llama()
    adapter = adapter_for(model)
    site = adapter.sites(model)[0]
    left, right = factors(adapter.read(site), "vo")
    before = left @ right.mT  # the per-group V-O products
    attach(model, TuneConfig(targets=("vo",), progress=False))
    with torch.no_grad():
        site.module.clover_tune.vo_core.add_(torch.randn_like(site.module.clover_tune.vo_core))
    merge_(model, verify=False)
    left, right = factors(adapter.read(site), "vo")
    delta = left @ right.mT - before
    d = adapter.read(site).vo_dim
    assert [torch.linalg.matrix_rank(g).item() for g in delta] == [d] * delta.shape[0]


def test_spectrum_core_scale_steps_strong_directions_more(tmp_path):
    """``core_scale="spectrum"``: the same function at step zero, with each factor column scaled by
    sqrt(s / mean s), so a unit step on core entry (i, j) moves the product by sqrt(s_i s_j) / mean(s) instead of 1;
    the core starts at mean(s) I. The decomposed checkpoint keeps the scale, and a run at another scale is refused."""
    unit, spectrum = tiny_llama(), tiny_llama()
    attach(unit, TuneConfig(targets=("vo", "up"), progress=False))
    report = attach(spectrum, TuneConfig(targets=("vo", "up"), core_scale="spectrum", progress=False))
    assert report.check.passed, report.check
    for name in ("vo", "up"):
        plain = dict(unit.named_modules())[f"model.layers.0.{'self_attn' if name == 'vo' else 'mlp.up_proj'}"]
        scaled = dict(spectrum.named_modules())[f"model.layers.0.{'self_attn' if name == 'vo' else 'mlp.up_proj'}"]
        s = torch.diagonal(getattr(plain.clover_tune, f"{name}_core").detach(), dim1=-2, dim2=-1)
        mean = s.mean(dim=-1, keepdim=True)
        for side in ("left", "right"):
            norms = getattr(scaled.clover_tune, f"{name}_{side}").norm(dim=-2)
            assert torch.allclose(norms, (s / mean).sqrt(), rtol=1e-4), (name, side)
        core = getattr(scaled.clover_tune, f"{name}_core").detach()
        assert torch.allclose(core, torch.diag_embed(mean.expand_as(s)), rtol=1e-5), name
    save_decomposed(spectrum, None, tmp_path / "dec")
    loaded, _, tune = load_decomposed(tmp_path / "dec")
    assert tune.core_scale == "spectrum"
    with pytest.raises(CloverError, match="attached with core scale 'spectrum', not 'unit'"):
        prepare(loaded, FinetuneConfig(steps=1))
    with pytest.raises(CloverError, match="use it with --method clover"):
        FinetuneConfig(method="lora", core_scale="spectrum").check()
    with pytest.raises(CloverError, match="unknown --core-scale 'pissa'"):
        FinetuneConfig(core_scale="pissa").check()


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_merged_model_loads_with_stock_from_pretrained(builder, tmp_path):
    model = builder()
    inputs = adapter_for(model).example_inputs(model)
    attach(model, TuneConfig(progress=False))
    _steps(model, inputs)
    tuned = model_outputs(model, inputs)
    merge_(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.allclose(model_outputs(reloaded, inputs), tuned, atol=1e-5 * tuned.abs().max().item())


def test_pruned_model_prune_tune_merge_reload(tmp_path):
    from clover.prune import PruneConfig, prune
    from clover.save import save_model

    pruned, _ = prune(tiny_llama(), PruneConfig(vo_ratio=0.5, criterion="clover", progress=False))
    inputs = adapter_for(pruned).example_inputs(pruned)
    report = attach(pruned, TuneConfig(progress=False))
    assert report.check.passed and report.targets == ("k", "vo", "up")
    _steps(pruned, inputs)
    tuned = model_outputs(pruned, inputs)
    merge_(pruned)
    assert pruned.config.vo_dims == [8, 8]
    save_model(pruned, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.model_type == "clover_llama"
    assert torch.allclose(model_outputs(reloaded, inputs), tuned, atol=1e-5 * tuned.abs().max().item())


def test_bias_training_trains_biases_with_the_cores():
    model = TINY_MODELS["llama-gqa-bias"]()
    inputs = adapter_for(model).example_inputs(model)
    site = adapter_for(model).sites(model)[0]
    without = clover_parameter_count(model, ("k", "vo"))
    report = attach(model, TuneConfig(targets=("k", "vo"), train_bias=True, progress=False))
    assert report.trainable_parameters == clover_parameter_count(TINY_MODELS["llama-gqa-bias"](), ("k", "vo"), True)
    assert report.trainable_parameters > without
    bias_before = site.module.q_proj.bias.detach().clone()
    _steps(model, inputs)
    merge_(model)
    assert not torch.allclose(site.module.q_proj.bias, bias_before)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_lora_count_is_what_peft_trains(builder):
    model = builder()
    modules = target_modules(model, None)
    expected = lora_parameter_count(model, modules, 4)
    setup = prepare(model, FinetuneConfig(method="lora", lora_r=4))
    assert setup.trainable == expected


def test_match_lora_picks_the_closest_target_set():
    model = tiny_llama()
    chosen, clover, lora = match_lora(model, None, 2)
    assert lora == lora_parameter_count(model, target_modules(model, None), 2)
    every = clover_parameter_count(model, ("k", "vo", "up"))
    assert clover == clover_parameter_count(model, chosen)
    assert abs(clover - lora) <= abs(every - lora)


def test_decomposed_checkpoint_round_trip(tmp_path):
    """What every rank of a distributed run loads: same tensors, same outputs, no SVD."""
    model = tiny_llama()
    inputs = adapter_for(model).example_inputs(model)
    attach(model, TuneConfig(progress=False))
    _steps(model, inputs, n=1)
    tuned = model_outputs(model, inputs)
    save_decomposed(model, None, tmp_path / "dec")
    loaded, _, tune = load_decomposed(tmp_path / "dec")
    assert tune.targets == ("k", "vo", "up")
    assert torch.allclose(model_outputs(loaded, inputs), tuned, atol=1e-6 * tuned.abs().max().item())
    assert trainable_parameters(loaded) == trainable_parameters(model)


# --- bad input ---------------------------------------------------------------------------------------------------

def test_bad_targets_and_models_fail_clearly(monkeypatch):
    with pytest.raises(CloverError, match="unknown fine-tuning target"):
        attach(tiny_llama(), TuneConfig(targets=("attn",)))
    with pytest.raises(CloverError, match="use target 'k'"):
        attach(tiny_llama(), TuneConfig(targets=("qk",)))
    with pytest.raises(CloverError, match="pick one"):
        attach(tiny_gpt2(), TuneConfig(targets=("qk", "k")))
    with pytest.raises(CloverError, match="unsupported model type"):
        attach(torch.nn.Linear(2, 2))
    from clover.adapters.gpt2 import GPT2Adapter

    monkeypatch.setattr(GPT2Adapter, "mlp_up", lambda self, model: [])
    with pytest.raises(CloverError, match="no MLP up projection"):
        attach(tiny_gpt2(), TuneConfig(targets=("vo", "up")))
    model = tiny_gpt2()
    attach(model, TuneConfig(targets=("vo",), progress=False))
    with pytest.raises(CloverError, match="already has CLOVER tuners"):
        attach(model, TuneConfig(targets=("vo",)))
    with pytest.raises(CloverError, match="cannot be trained with lora"):
        prepare(model, FinetuneConfig(method="lora"))
    with pytest.raises(CloverError, match="no CLOVER tuners to merge"):
        merge_(tiny_gpt2())
    with pytest.raises(CloverError, match="unknown method"):
        FinetuneConfig(method="qlora").check()


def test_bad_data_fails_clearly(tmp_path):
    with pytest.raises(CloverError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CloverError, match="is empty"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CloverError, match="unknown format"):
        load_texts(tmp_path / "x.csv")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "no text"}\n')
    with pytest.raises(CloverError, match="no 'text'"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "ok.jsonl").write_text('{"text": "a b c"}\n\n{"text": "d e"}\n')
    assert load_texts(tmp_path / "ok.jsonl") == ["a b c", "d e"]


# --- training, checkpoints, resume -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(vocab_size=300)


def _dataset(tokenizer):
    return token_windows(tokenizer, [SAMPLE_TEXT * 10], 32)


def test_resume_after_interruption_loses_nothing(tokenizer, tmp_path):
    """Two runs: uninterrupted, and one whose last checkpoint save was cut off; the merged weights are equal."""
    config = FinetuneConfig(method="clover", steps=4, save_steps=2, lr=1e-2, batch_size=2, logging_steps=2,
                            dropout=0.1)
    _, first = train(tiny_llama(vocab_size=320), tokenizer, _dataset(tokenizer), config, tmp_path / "run",
                     progress=False, log=lambda s: None)
    last = tmp_path / "run" / "checkpoint-4"
    assert (last / COMMIT_MARKER).is_file()
    shutil.rmtree(last)
    last.mkdir()  # an interrupted save: a folder without the commit marker is never resumed from
    (last / "model.safetensors").write_bytes(b"partial")
    _, second = train(tiny_llama(vocab_size=320), tokenizer, _dataset(tokenizer), config, tmp_path / "run",
                      progress=False, log=lambda s: None)
    assert second.resumed_from.endswith("checkpoint-2")
    assert second.digest == first.digest
    with pytest.raises(CloverError, match="another run \\(method 'clover' there, 'lora' now"):
        train(tiny_llama(vocab_size=320), tokenizer, _dataset(tokenizer), FinetuneConfig(method="lora", steps=2),
              tmp_path / "run", progress=False, log=lambda s: None)


@pytest.mark.parametrize("method", ["clover", "lora"])
def test_lr_scale_moves_only_its_target_by_that_factor(tokenizer, tmp_path, method):
    """Adam's first step moves each trained entry by about the lr, so with up's lr scaled by 1/4 every up projection
    moves a quarter as far and every other target exactly as far (LoRA: B starts at zero, so its whole update
    scales with B's step)."""
    def first_step(scales, name):
        model = tiny_llama(vocab_size=320)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        config = FinetuneConfig(method=method, targets=("k", "vo", "up"), steps=1, lr=1e-2, batch_size=2,
                                lr_scales=scales)
        tuned, _ = train(model, tokenizer, _dataset(tokenizer), config, tmp_path / name, progress=False,
                         log=lambda s: None)
        return {k: (v - before[k]).norm().item() for k, v in tuned.state_dict().items()}

    plain, scaled = first_step((), "plain"), first_step("up=0.25", "scaled")
    moved = [k for k, v in plain.items() if v > 0]
    assert {k.split(".")[-2] for k in moved} == {"k_proj", "v_proj", "o_proj", "up_proj"}
    for k in moved:
        assert scaled[k] == pytest.approx((0.25 if "up_proj" in k else 1.0) * plain[k], rel=1e-3), k


def test_adam_eps_reaches_the_optimiser_and_the_run(tokenizer, tmp_path):
    """Adam's first step is lr * g / (|g| + eps): about the lr per entry at the default eps, and a small fraction
    of it where eps dwarfs every gradient (LoRA: its merge adds only what training moved, B starting at zero). A
    checkpoint written at one eps belongs to another run than at another."""
    def first_step(eps, name):
        model = tiny_llama(vocab_size=320)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        config = FinetuneConfig(method="lora", targets=("k", "vo"), steps=1, lr=1e-2, batch_size=2, adam_eps=eps, save_steps=1)
        tuned, _ = train(model, tokenizer, _dataset(tokenizer), config, tmp_path / name, progress=False,
                         log=lambda s: None)
        return sum((v - before[k]).norm().item() for k, v in tuned.state_dict().items())

    plain, damped = first_step(None, "plain"), first_step(1e3, "damped")
    assert plain > 0 and damped < 1e-2 * plain, (plain, damped)
    with pytest.raises(CloverError, match="adam_eps 1000.0 there, 0.01 now"):
        train(tiny_llama(vocab_size=320), tokenizer, _dataset(tokenizer),
              FinetuneConfig(method="lora", targets=("k", "vo"), steps=1, lr=1e-2, batch_size=2, adam_eps=1e-2,
                             save_steps=1), tmp_path / "damped",
              progress=False, log=lambda s: None)
    for eps in (0.0, -1e-3):
        with pytest.raises(CloverError, match="--adam-eps .* is not positive"):
            FinetuneConfig(adam_eps=eps).check()


def test_bad_lr_scales_fail_clearly(tokenizer, tmp_path):
    for spec, message in (("up", "not TARGET=NUMBER"), ("up=fast", "not TARGET=NUMBER"), ("mlp=2", "unknown target"),
                          ("up=0", "not positive"), ("up=1,up=2", "two learning-rate scales")):
        with pytest.raises(CloverError, match=message):
            FinetuneConfig(lr_scales=spec)
    assert FinetuneConfig(lr_scales="vo=2, up=0.5").lr_scales == (("up", 0.5), ("vo", 2.0))
    for method in ("clover", "lora"):
        with pytest.raises(CloverError, match="not among the targets trained"):
            train(tiny_llama(vocab_size=320), tokenizer, _dataset(tokenizer),
                  FinetuneConfig(method=method, targets=("k", "vo"), steps=1, lr_scales="up=2"), tmp_path / method,
                  progress=False, log=lambda s: None)
    with pytest.raises(CloverError, match="--method full trains every weight"):
        train(tiny_llama(vocab_size=320), tokenizer, _dataset(tokenizer),
              FinetuneConfig(method="full", steps=1, lr_scales="up=2"), tmp_path / "full", progress=False,
              log=lambda s: None)


def test_cli_finetune_init_only_then_train(tokenizer, tmp_path):
    from typer.testing import CliRunner

    from clover.cli import app

    base = tmp_path / "base"
    tiny_gpt2(vocab_size=320).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "train.txt"
    data.write_text(SAMPLE_TEXT * 10)
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", str(base), "--method", "clover", "--init-only", "--out",
                                 str(tmp_path / "dec")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finetune", str(tmp_path / "dec"), "--data", str(data), "--steps", "2",
                                 "--batch-size", "2", "--seqlen", "32", "--lr", "1e-2", "--out", str(tmp_path / "out"),
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "trainable parameters" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "clover" and report["steps"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    # cores decomposed at the spectrum scale train only at that scale: without --core-scale the run is refused
    result = runner.invoke(app, ["finetune", str(base), "--method", "clover", "--init-only", "--core-scale",
                                 "spectrum", "--out", str(tmp_path / "dec2")])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(app, ["finetune", str(tmp_path / "dec2"), "--data", str(data), "--steps", "2", "--batch-size",
                              "2", "--seqlen", "32", "--out", str(tmp_path / "o4")])
    assert bad.exit_code == 2 and "--core-scale spectrum" in " ".join(bad.output.split()), bad.output
    assert not (tmp_path / "o4").exists()
    bad = runner.invoke(app, ["finetune", str(base), "--data", str(tmp_path / "nope.txt"), "--out",
                              str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad = runner.invoke(app, ["finetune", str(base), "--data", str(data), "--targets", "xyz", "--steps", "1",
                              "--seqlen", "32",
                              "--out", str(tmp_path / "o3")])
    assert bad.exit_code == 2 and "unknown fine-tuning target" in bad.output


def _other_families():
    """The paper's other families, tiny and random: (name, builder, targets attach picks by default)."""
    from test_deepseek_v2 import tiny_deepseek
    from test_mllama import tiny_mllama
    from test_unet import tiny_unet
    from test_whisper import tiny_whisper
    return [("whisper", tiny_whisper, ("qk", "vo")), ("deepseek_v2", tiny_deepseek, ("qk", "vo", "up")),
            ("mllama", tiny_mllama, ("k", "vo")), ("unet", tiny_unet, ("qk", "vo"))]


@pytest.mark.parametrize("index", range(4), ids=["whisper", "deepseek_v2", "mllama", "unet"])
def test_other_families_tune_exactly_and_merge_to_the_same_shapes(index):
    name, build, targets = _other_families()[index]
    model = build()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    inputs = adapter_for(model).example_inputs(model)
    before = model_outputs(model, inputs)
    report = attach(model, TuneConfig(progress=False))
    assert report.targets == targets, name
    assert report.check.passed and report.trainable_parameters > 0
    assert torch.allclose(model_outputs(model, inputs), before, atol=1e-4 * before.abs().max().item())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    tuned = model_outputs(model, inputs)
    assert not torch.allclose(tuned, before, atol=1e-3 * before.abs().max().item()), name
    merge_(model)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert torch.allclose(model_outputs(model, inputs), tuned, atol=1e-4 * tuned.abs().max().item())


def test_a_unet_without_mlp_up_support_names_the_fix():
    from test_unet import tiny_unet
    with pytest.raises(CloverError, match="UNet2DConditionModel model has no MLP up projection"):
        attach(tiny_unet(), TuneConfig(targets="qk,vo,up", progress=False))


def test_cli_resume_respects_what_changed(tokenizer, tmp_path):
    """Other data or lr with --overwrite starts afresh (a new model); without it, the old checkpoints are refused."""
    from typer.testing import CliRunner

    from clover.cli import app

    base = tmp_path / "base"
    tiny_llama(vocab_size=320).save_pretrained(base)
    tokenizer.save_pretrained(base)
    (tmp_path / "a.txt").write_text(SAMPLE_TEXT * 10)
    (tmp_path / "b.txt").write_text(SAMPLE_TEXT.upper() * 10)
    runner = CliRunner()

    def tune(data, lr, *extra):
        result = runner.invoke(app, ["finetune", str(base), "--data", str(tmp_path / data), "--steps", "2",
                                     "--save-steps", "1", "--batch-size", "2", "--seqlen", "32", "--lr", lr,
                                     "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"), *extra])
        return result.exit_code, result.output

    code, out = tune("a.txt", "1e-2")
    assert code == 0, out
    first = json.loads((tmp_path / "r.json").read_text())
    code, out = tune("b.txt", "5e-3", "--overwrite")
    assert code == 0, out
    second = json.loads((tmp_path / "r.json").read_text())
    assert second["resumed_from"] is None and second["digest"] != first["digest"]
    assert second["config"]["data"].endswith(
        hashlib.sha256((tmp_path / "b.txt").read_bytes()).hexdigest())
    # The same output name without --overwrite is refused before anything; another --out over the same checkpoints
    # with other settings is refused naming what differs.
    code, out = tune("a.txt", "1e-2", "--checkpoints", str(tmp_path / "out.checkpoints"))
    assert code == 2 and "--overwrite" in out
    result = runner.invoke(app, ["finetune", str(base), "--data", str(tmp_path / "a.txt"), "--steps", "2",
                                 "--batch-size", "2", "--seqlen", "32", "--lr", "1e-2", "--out", str(tmp_path / "o2"),
                                 "--checkpoints", str(tmp_path / "out.checkpoints")])
    assert result.exit_code == 2 and "belong to another run" in result.output, result.output
    assert "lr 0.005 there, 0.01 now" in " ".join(result.output.split())
    assert not (tmp_path / "o2").exists()
    # a per-target lr scale is part of the run too: the same checkpoints with one are another run's
    result = runner.invoke(app, ["finetune", str(base), "--data", str(tmp_path / "b.txt"), "--steps", "2",
                                 "--batch-size", "2", "--seqlen", "32", "--lr", "5e-3", "--lr-scale", "up=0.5",
                                 "--out", str(tmp_path / "o3"), "--checkpoints", str(tmp_path / "out.checkpoints")])
    assert result.exit_code == 2, result.output
    assert "lr_scales None there, {'up': 0.5} now" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o3").exists()
