"""Healing an MLA conversion by KL distillation from the original: CLOVER cores no wider than the pairs' rank,
LoRA / PiSSA at the matched budget, the format's fixed tensors untouched, and the CLI's refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_llama
from tiny_tokenizer import SAMPLE_TEXT, tiny_tokenizer
from transformers import DeepseekV3ForCausalLM
from typer.testing import CliRunner

import clover  # noqa: F401
from clover.cli import app
from clover.errors import CloverError
from clover.finetune import TuneConfig, attach, clover_parameter_count, merge_
from clover.finetune.data import TokenWindows
from clover.finetune.train import late_heldout_loss
from clover.heal import HealConfig, distill, heal
from clover.heal.distill import kl_per_token, mean_kl
from clover.mla import MlaConfig, to_mla
from clover.save import save_model

CALIB = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
TRAIN = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(2))
HELD = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(3))
runner = CliRunner()


@pytest.fixture(scope="module")
def pair():
    """The original (two KV heads of 16 dims) and its MLA conversion at KV 50% (a 16-dim latent, 16 key dims
    without rotation)."""
    teacher = tiny_llama(vocab_size=300, num_key_value_heads=2)
    mla, report = to_mla(teacher, MlaConfig(kv_ratio=0.5, calibration=CALIB, progress=False))
    assert (report.kv_lora_rank, report.qk_nope_head_dim) == (16, 16)
    return teacher, mla


def kl(model, teacher) -> float:
    """The objective on the training windows (random tokens teach nothing that carries to other windows)."""
    with torch.no_grad():
        return float(kl_per_token(model(TRAIN).logits, teacher(TRAIN).logits))


def quiet(*_):
    pass


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert float(kl_per_token(logits, logits)) == 0.0
    assert float(kl_per_token(logits, logits.flip(-1))) > 0.0


def test_mean_kl_is_the_token_weighted_objective_over_held_out_windows(pair):
    teacher, mla = pair
    with torch.no_grad():
        whole = float(kl_per_token(mla(HELD).logits, teacher(HELD).logits))
    # batches of 3 over 8 windows: the last is short, and still weighs by its tokens
    assert mean_kl(mla, teacher, HELD, batch_size=3) == pytest.approx(whole, rel=1e-5)
    assert mean_kl(mla, teacher, HELD) > 0.0
    assert mean_kl(teacher, teacher, HELD) == pytest.approx(0.0, abs=1e-7 * whole)


def test_clover_cores_are_no_wider_than_the_latent_and_every_entry_learns():
    """A pair reading a latent narrower than the head has at most that many directions: wider cores would hold
    entries no gradient reaches. Cores are cut to the pair's rank, the count says so, and every entry gets a
    gradient; the outputs are unchanged when attached and after merging."""
    teacher = tiny_llama(vocab_size=300, num_key_value_heads=2)
    mla, report = to_mla(teacher, MlaConfig(kv_ratio=0.75, rope_dims=8, calibration=CALIB, progress=False))
    rank = report.kv_lora_rank
    assert rank < report.qk_nope_head_dim and rank < 16  # latent narrower than the nope key and the value
    before = mla(HELD).logits.detach()
    budget = clover_parameter_count(mla, ("qk", "vo"))
    attached = attach(mla, TuneConfig(targets=("qk", "vo"), progress=False))
    assert attached.check.passed and attached.trainable_parameters == budget
    tuner = mla.model.layers[0].self_attn.clover_tune
    assert tuner.qk_core.shape[-1] == tuner.vo_core.shape[-1] == rank
    mla(HELD).logits.float().pow(2).mean().backward()
    for name in ("qk_core", "vo_core"):
        grad = getattr(tuner, name).grad
        assert bool((grad != 0).all()), name
    merge_(mla)
    after = mla(HELD).logits.detach()
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4


def test_rope_cores_train_each_heads_rotated_query_rows_and_nothing_else(pair):
    """The ``rope`` target: one rope x rope core per head on the query rows that meet the shared rotated key.
    Attaching and merging leave the outputs as they were; a step moves only those rows (the shared key, the nope
    rows and every other tensor stay bit-identical), and a model with a key per head is refused by name."""
    teacher, mla = pair
    student = copy.deepcopy(mla)
    attn = student.model.layers[0].self_attn
    nope, rope, heads = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.num_heads
    before = student(HELD).logits.detach()
    params = {n: p.detach().clone() for n, p in student.named_parameters()}
    attached = attach(student, TuneConfig(targets=("rope",), progress=False))
    layers = student.config.num_hidden_layers
    assert attached.check.passed and attached.trainable_parameters == layers * heads * rope ** 2
    assert attached.trainable_parameters == clover_parameter_count(mla, ("rope",))
    student(HELD).logits.float().pow(2).mean().backward()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.requires_grad:
                assert name.endswith("rope_core") and bool((p.grad != 0).any()), name
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1 * p.abs().max())
    merge_(student, verify=False)
    after = dict(student.named_parameters())
    assert set(after) == set(params)
    moved = {n for n, p in params.items() if not torch.equal(after[n], p)}
    assert moved == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(layers)}
    q = after["model.layers.0.self_attn.q_proj.weight"].reshape(heads, nope + rope, -1)
    q0 = params["model.layers.0.self_attn.q_proj.weight"].reshape(heads, nope + rope, -1)
    assert torch.equal(q[:, :nope], q0[:, :nope]) and not torch.equal(q[:, nope:], q0[:, nope:])
    untouched = copy.deepcopy(mla)
    attach(untouched, TuneConfig(targets=("qk", "vo", "rope"), progress=False))
    merge_(untouched)
    assert float((untouched(HELD).logits - before).abs().max() / before.abs().max()) < 1e-4
    with pytest.raises(CloverError, match="target 'rope' trains query rows"):
        attach(copy.deepcopy(teacher), TuneConfig(targets=("rope",), progress=False))


@pytest.mark.parametrize("method", ["clover", "lora", "pissa"])
def test_healing_moves_the_conversion_toward_the_original(pair, method, tmp_path):
    teacher, mla = pair
    student = copy.deepcopy(mla)
    kl_before = kl(student, teacher)
    shapes = {n: p.shape for n, p in student.named_parameters()}
    fixed = {n: p.detach().clone() for n, p in student.named_parameters() if "kv_a" in n or "norm" in n}
    healed, report = heal(student, teacher, None, TokenWindows(TRAIN),
                          HealConfig(method=method, steps=30, lr=1e-2, seqlen=32, progress=False), tmp_path / "run",
                          log=quiet)
    assert isinstance(healed, DeepseekV3ForCausalLM) and healed.config.clover_linear_latent_norm
    assert {n: p.shape for n, p in healed.named_parameters()} == shapes  # the same stock layout
    assert all(torch.equal(dict(healed.named_parameters())[n], t) for n, t in fixed.items())
    assert report.unchanged > len(fixed) and report.steps == 30
    assert report.heldout_kl is None  # 60 windows drawn from 16: every late window had been trained on
    assert kl(healed, teacher) < 0.9 * kl_before, method
    if method == "clover":
        assert report.trainable == report.clover_budget and report.lora_r is None
    else:  # the rank whose count is closest to CLOVER's: within half a rank's worth
        per_rank = report.trainable / report.lora_r
        assert abs(report.trainable - report.clover_budget) <= per_rank / 2 + 1e-9


def test_late_heldout_kl_reads_the_last_quarter_of_one_pass():
    """The figure the benchmark picks a learning rate by: the losses logged after 3/4 of the steps, and only while
    no window has come round twice (a second pass scores windows the model was trained on)."""
    history = [{"loss": 4.0, "step": 10}, {"loss": 3.0, "step": 20}, {"loss": 2.0, "step": 30},
               {"loss": 1.0, "step": 40}, {"loss": 0.5, "step": 45}, {"train_loss": 2.1, "step": 45}]
    assert late_heldout_loss(history, 40, epochs=0.4) == 0.75  # steps 40 and 45 (> 30); the summary is skipped
    assert late_heldout_loss(history, 40, epochs=1.5) is None
    assert late_heldout_loss(history[:2], 40, epochs=0.4) is None


def test_a_single_pass_reports_its_late_kl(pair, tmp_path):
    teacher, mla = pair
    _, report = heal(copy.deepcopy(mla), teacher, None, TokenWindows(TRAIN),
                     HealConfig(method="clover", steps=4, lr=1e-2, seqlen=32, logging_steps=1, progress=False),
                     tmp_path / "run", log=quiet)
    assert report.heldout_kl is not None and 0 < report.heldout_kl < 2 * kl(mla, teacher)


def test_lora_cannot_scale_one_module_two_ways(pair, tmp_path):
    """``qk`` and ``rope`` both adapt the query projection in LoRA: one module, one learning rate."""
    teacher, mla = pair
    with pytest.raises(CloverError, match="adapted for more than one target"):
        heal(copy.deepcopy(mla), teacher, None, TokenWindows(TRAIN),
             HealConfig(method="lora", targets=("qk", "vo", "rope"), lr_scales="rope=2", steps=1, seqlen=32,
                        progress=False), tmp_path / "run", log=quiet)


def test_the_control_starts_at_zero_and_stays_near_it(pair, tmp_path):
    """The benchmark's control, the original tuned toward itself the same way, starts with exactly zero KL (LoRA
    starts at the original bit for bit); only rounding-level gradients reach it, so it stays far closer to its
    teacher than any conversion starts."""
    teacher, mla = pair
    student = copy.deepcopy(teacher)
    assert kl(student, teacher) == 0.0
    out, report = distill(student, teacher, None, TokenWindows(TRAIN),
                          HealConfig(method="lora", targets=("k", "vo", "up"), steps=3, lr=1e-2, seqlen=32,
                                     progress=False), tmp_path / "run", log=quiet)
    assert type(out).__name__ == "LlamaForCausalLM" and report.steps == 3
    assert kl(out, teacher) < 1e-2 * kl(mla, teacher)


def test_heal_refuses_what_is_not_an_mla_conversion(pair, tmp_path):
    teacher, mla = pair
    with pytest.raises(CloverError, match="not an MLA conversion"):
        heal(copy.deepcopy(teacher), teacher, None, TokenWindows(TRAIN), HealConfig(seqlen=32, progress=False),
             tmp_path / "run", log=quiet)
    other = tiny_llama(vocab_size=300, num_key_value_heads=2, num_hidden_layers=3)
    with pytest.raises(CloverError, match="num_hidden_layers 2 but teacher has 3"):
        heal(copy.deepcopy(mla), other, None, TokenWindows(TRAIN), HealConfig(seqlen=32, progress=False),
             tmp_path / "run", log=quiet)
    with pytest.raises(CloverError, match="unknown healing method 'dora'"):
        HealConfig(method="dora").check()
    with pytest.raises(CloverError, match="both train the Q-K scores"):  # the names are checked before any load
        HealConfig(targets=("qk", "k")).check()


def test_cli_heals_saves_and_refuses(pair, tmp_path):
    teacher, mla = pair
    save_model(teacher, tiny_tokenizer(), tmp_path / "llama")
    save_model(mla, tiny_tokenizer(), tmp_path / "mla")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 10)
    common = ["--teacher", str(tmp_path / "llama"), "--data", str(tmp_path / "text.txt"), "--seqlen", "32",
              "--steps", "4", "--save-steps", "2", "--lr", "1e-3"]
    result = runner.invoke(app, ["heal", str(tmp_path / "mla"), "--out", str(tmp_path / "out"), *common,
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "clover" and report["steps"] == 4 and report["trainable"] == report["clover_budget"]
    assert DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").config.clover_linear_latent_norm
    # peft on a DeepSeek-V3 loaded from disk: the dense up projections are adapted like any linear module
    result = runner.invoke(app, ["heal", str(tmp_path / "mla"), "--out", str(tmp_path / "lora"), *common,
                                 "--method", "lora", "--json", str(tmp_path / "l.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "l.json").read_text())
    assert report["method"] == "lora" and report["lora_r"] >= 1
    assert DeepseekV3ForCausalLM.from_pretrained(tmp_path / "lora").config.model_type == "deepseek_v3"

    def refused(args: list[str], message: str, before_loading: bool = True) -> None:
        got = runner.invoke(app, ["heal", *args])
        assert got.exit_code == 2 and message in got.output.strip().splitlines()[-1], got.output
        if before_loading:  # no progress bar: refused from the configs alone
            assert len(got.output.strip().splitlines()) == 1

    refused([str(tmp_path / "llama"), "--out", str(tmp_path / "o2"), *common], "not an MLA conversion")
    assert not (tmp_path / "o2").exists()
    # the same checkpoints with another learning rate: another run
    refused([str(tmp_path / "mla"), "--out", str(tmp_path / "o3"), "--checkpoints", str(tmp_path / "out.checkpoints"),
             *common[:-1], "2e-3"], "belong to another run", before_loading=False)
    assert not (tmp_path / "o3").exists()
    refused([str(tmp_path / "mla"), "--out", str(tmp_path / "out"), *common], "exists")
    refused([str(tmp_path / "mla"), "--out", str(tmp_path / "o4"), *common, "--method", "dora"],
            "unknown healing method")
    refused([str(tmp_path / "mla"), "--out", str(tmp_path / "o5"), *common, "--lr-scale", "up:2"],
            "not TARGET=NUMBER")
    refused([str(tmp_path / "mla"), "--out", str(tmp_path / "o6"), *common, "--method", "lora", "--core-scale",
             "spectrum"], "use it with --method clover")
    refused([str(tmp_path / "mla"), "--out", str(tmp_path / "o7"), *common, "--adam-eps", "0"], "not positive")
    refused([str(tmp_path / "mla"), "--out", str(tmp_path / "o8"), *common, "--targets", "vo,zz"],
            "unknown fine-tuning target")
