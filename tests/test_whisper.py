"""Whisper: encoder self-, decoder self- and decoder cross-attention, orthogonalized exactly and pruned for real."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import DATA, INIT
from tiny_tokenizer import tiny_tokenizer
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSpeechSeq2Seq,
    WhisperConfig,
    WhisperForAudioClassification,
    WhisperForConditionalGeneration,
)
from typer.testing import CliRunner

import clover  # noqa: F401  (registers clover_whisper)
from clover import models
from clover.adapters import adapter_for
from clover.adapters.whisper import set_calibration_features, synthetic_log_mel
from clover.calibrate import collect
from clover.cli import app
from clover.errors import CloverError
from clover.orthogonalize import orthogonalize_
from clover.pairs import factors
from clover.prune import PruneConfig, kv_bytes_per_token, prune
from clover.save import save_model
from clover.verify import model_outputs

VOCAB = 128
MEL, SOURCE = 16, 16  # mel bins, encoder positions (input frames = 2 * SOURCE)
CALIB = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))


def tiny_whisper(vocab_size=VOCAB, seed=0, **kw):
    cfg = WhisperConfig(vocab_size=vocab_size, num_mel_bins=MEL, encoder_layers=2, decoder_layers=2, d_model=64,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_source_positions=SOURCE, max_target_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3, init_std=INIT, **kw)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random biases so the homogeneous column is exercised (HF zero-initialises them)
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.normal_(0, INIT)
    return model


def inputs(seed=1, batch=2, tokens=12):
    gen = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(batch, MEL, 2 * SOURCE, generator=gen),
            "decoder_input_ids": torch.randint(0, VOCAB, (batch, tokens), generator=gen)}


def greedy(model, features, new_tokens=8, **kw):
    return model.generate(features, max_new_tokens=new_tokens, do_sample=False, **kw)


def _kinds(model):
    adapter = adapter_for(model)
    return {site.stack: site for site in adapter.sites(model) if site.layer == 0}


def test_sites_cover_three_kinds_of_block():
    model = tiny_whisper()
    sites = adapter_for(model).sites(model)
    assert [(s.stack, s.role, s.layer) for s in sites] == [
        ("encoder", "self", 0), ("encoder", "self", 1),
        ("decoder", "self", 0), ("cross", "cross", 0), ("decoder", "self", 1), ("cross", "cross", 1)]
    assert [s.caches_kv for s in sites] == [False, False, True, False, True, False]
    w = adapter_for(model).read(sites[3])
    assert w.k.bias is None and w.q.bias is not None and w.v.bias is not None and w.o.bias is not None


def test_orthogonalize_is_exact_and_orthogonal_on_every_kind():
    model = tiny_whisper()
    x = inputs()
    before = model_outputs(model, x)
    report = orthogonalize_(model, clover.OrthogonalizeConfig(progress=False))
    assert report.counts() == {"qk rewritten": 6, "vo rewritten": 6}
    assert report.check.passed
    after = model_outputs(model, x)  # other inputs than the built-in check's
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    adapter = adapter_for(model)
    for stack, site in _kinds(model).items():
        w = adapter.read(site)
        for kind in ("qk", "vo"):
            left, right = factors(w, kind)
            gram_l, gram_r = left.double().mT @ left.double(), right.double().mT @ right.double()
            off = lambda g: (g - torch.diag_embed(g.diagonal(dim1=-2, dim2=-1))).abs().max()  # noqa: E731
            assert off(gram_l) <= 1e-4 * gram_l.abs().max(), (stack, kind)
            assert off(gram_r) <= 1e-4 * gram_r.abs().max(), (stack, kind)
            # sqrt(S) on each side: equal column norms, sorted descending
            norms = gram_l.diagonal(dim1=-2, dim2=-1)
            assert torch.allclose(norms, gram_r.diagonal(dim1=-2, dim2=-1), rtol=1e-3)
            assert (norms[:, :-1] >= norms[:, 1:] * (1 - 1e-4)).all()


def test_generate_tokens_equal_after_orthogonalize():
    model = tiny_whisper()
    features = inputs()["input_features"]
    want = greedy(model, features)
    orthogonalize_(model, clover.OrthogonalizeConfig(progress=False))
    assert torch.equal(greedy(model, features), want)


@pytest.mark.parametrize("criterion", ["vanilla", "clover", "whitened"])
def test_prune_shrinks_all_three_kinds_and_generate_runs(criterion):
    model = tiny_whisper()
    config = PruneConfig(qk_ratio=0.5, vo_ratio=0.25, criterion=criterion, calibration=CALIB, progress=False)
    pruned, report = prune(model, config)
    assert type(pruned).__name__ == "CloverWhisperForConditionalGeneration"
    adapter = adapter_for(pruned)
    sites = adapter.sites(pruned)
    assert {s.stack for s in sites} == {"encoder", "decoder", "cross"}
    for site in sites:
        m = site.module
        assert m.q_proj.weight.shape == (4 * 8, 64) and m.k_proj.weight.shape == (4 * 8, 64)  # head_dim 16
        assert m.v_proj.weight.shape == (4 * 12, 64) and m.out_proj.weight.shape == (64, 4 * 12)
        assert m.scaling == 16**-0.5  # the original softmax scale
    assert report.params_after < report.params_before
    # decoder self-attention only: 2 layers x (K + V) x 4 heads x 4 bytes
    assert report.kv_bytes_per_token_before == 2 * (64 + 64) * 4
    assert report.kv_bytes_per_token_after == 2 * (32 + 48) * 4 == kv_bytes_per_token(pruned)
    assert any("cross-attention" in note for note in report.notes)
    assert adapter_for(model).read(adapter_for(model).sites(model)[0]).qk_dim == 16  # input untouched
    features = inputs()["input_features"]
    tokens = greedy(pruned, features)
    assert tokens.shape[0] == 2 and tokens.shape[1] >= 2
    # the cache (smaller K/V, cross-attention reused after the first step) gives what full recomputation gives
    assert torch.equal(tokens, greedy(pruned, features, use_cache=False))


def test_zero_thresholds_keep_everything_and_are_exact():
    model = tiny_whisper()
    pruned, report = prune(model, PruneConfig(qk_threshold=0.0, vo_threshold=0.0, progress=False))
    assert report.allocation == "threshold"
    assert all((lr.qk_dim, lr.vo_dim) == (16, 16) for lr in report.layers)
    x = inputs()
    want = model_outputs(model, x)
    assert (model_outputs(pruned, x) - want).abs().max() <= 1e-4 * want.abs().max()


def test_thresholds_remove_the_directions_below_them():
    """The paper's Whisper recipe: absolute singular-value thresholds per pair, no ratio, no training."""
    model = tiny_whisper()
    spectra = orthogonalize_(tiny_whisper(), clover.OrthogonalizeConfig(progress=False, verify=False)).pairs
    values = {kind: torch.tensor([p.singular_values for p in spectra if p.kind == kind]) for kind in ("qk", "vo")}
    thresholds = {kind: v.flatten().median().item() for kind, v in values.items()}
    pruned, report = prune(model, PruneConfig(qk_threshold=thresholds["qk"], vo_threshold=thresholds["vo"],
                                              progress=False))
    for lr in report.layers:
        for kind in ("qk", "vo"):
            s = torch.tensor(next(p.singular_values for p in spectra if p.site == lr.site and p.kind == kind))
            # ranks stay equal across heads: the head with most directions above the threshold sets the width
            expected = max(1, int((s > thresholds[kind]).sum(-1).max()))
            assert getattr(lr, f"{kind}_dim") == expected, (lr.site, kind)
    removed = {kind: 1 - sum(getattr(lr, f"{kind}_dim") for lr in report.layers) / (16 * len(report.layers))
               for kind in ("qk", "vo")}
    assert all(0 < r < 1 for r in removed.values()), removed
    assert report.params_after < report.params_before
    assert greedy(pruned, inputs()["input_features"]).shape[0] == 2


def test_whitened_calibration_whitens_cross_attention_with_encoder_states():
    model = tiny_whisper()
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    stats = collect(model, adapter, sites, CALIB, progress=False)
    cross = stats.sites[sites[3].name]
    decoder_self = stats.sites[sites[2].name]
    assert cross.tokens == CALIB.numel() and cross.kv_tokens == CALIB.shape[0] * SOURCE  # text vs audio frames
    assert not torch.allclose(cross.kv_input, cross.q_input)
    assert decoder_self.kv_input is decoder_self.q_input
    assert cross.kv_input[-1, -1].item() == pytest.approx(1.0)  # a mean over frames: homogeneous 1 stays 1
    # user-supplied features replace the synthetic clips
    set_calibration_features(model, torch.zeros(2, MEL, 2 * SOURCE))
    with_zeros = collect(model, adapter, sites, CALIB, progress=False).sites[sites[3].name]
    assert not torch.allclose(with_zeros.kv_input, cross.kv_input)
    with pytest.raises(CloverError, match="WhisperFeatureExtractor"):
        set_calibration_features(model, torch.zeros(2, MEL, 7))


def test_synthetic_features_are_deterministic_log_mels():
    cfg = tiny_whisper().config
    a, b, c = synthetic_log_mel(cfg, 5), synthetic_log_mel(cfg, 5), synthetic_log_mel(cfg, 6)
    assert a.shape == (MEL, 2 * SOURCE) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.std() > 0.05  # not a flat spectrum


def test_save_and_load_round_trip(tmp_path):
    model = tiny_whisper()
    pruned, report = prune(model, PruneConfig(qk_ratio=0.25, vo_ratio=0.5, criterion="whitened", allocation="global",
                                              calibration=CALIB, progress=False))
    x = inputs()
    ref = model_outputs(pruned, x)
    save_model(pruned, None, tmp_path / "m", report=report.to_dict())
    loaded = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(pruned)
    assert torch.equal(model_outputs(loaded, x), ref)
    assert torch.equal(greedy(loaded, x["input_features"]), greedy(pruned, x["input_features"]))
    assert AutoModel.from_pretrained(tmp_path / "m").config.model_type == "clover_whisper"
    loaded_via_clover = models.load(str(tmp_path / "m")).model
    assert type(loaded_via_clover) is type(pruned)

    # Without clover: the modeling file written next to the weights is enough.
    script = (
        "import sys, torch; sys.modules['clover'] = None\n"
        "from transformers import AutoModelForSpeechSeq2Seq as A\n"
        f"m = A.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad(): out = m(**x).logits\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "out.pt").float(), ref)


def test_whisper_without_cross_attention_is_a_clear_error_and_nothing_changes():
    model = tiny_whisper()
    for layer in model.model.decoder.layers:
        layer.encoder_attn = None  # a Whisper-like decoder that does not attend to the encoder
    q_before = model.model.encoder.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(CloverError, match=r"model\.decoder\.layers\.0\.encoder_attn: expected a WhisperAttention, "
                                          r"found nothing.*WhisperForConditionalGeneration"):
        orthogonalize_(model, clover.OrthogonalizeConfig(progress=False))
    with pytest.raises(CloverError, match="encoder_attn"):
        prune(model, PruneConfig(vo_ratio=0.5, criterion="clover", progress=False))
    assert torch.equal(model.model.encoder.layers[0].self_attn.q_proj.weight, q_before)


def test_custom_attention_module_and_encoder_only_whisper_are_refused():
    model = tiny_whisper()
    model.model.decoder.layers[1].self_attn = nn.Identity()
    with pytest.raises(CloverError, match="decoder.layers.1.self_attn: expected a WhisperAttention, found Identity"):
        orthogonalize_(model, clover.OrthogonalizeConfig(progress=False))
    classifier = WhisperForAudioClassification(tiny_whisper().config)
    with pytest.raises(CloverError, match="has no decoder"):
        orthogonalize_(classifier, clover.OrthogonalizeConfig(progress=False))


# ---- CLI on a saved tiny Whisper --------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "whisper"
    tiny_whisper(vocab_size=300).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_load_model_gives_the_speech_seq2seq_head(whisper_dir):
    assert type(models.load(str(whisper_dir)).model) is WhisperForConditionalGeneration


def test_cli_orthogonalize_and_prune_with_thresholds(whisper_dir, tmp_path):
    code, out = run("orthogonalize", whisper_dir, "--out", tmp_path / "orth", "--json", tmp_path / "o.json")
    assert code == 0, out
    assert "PASSED" in out and json.loads((tmp_path / "o.json").read_text())["check"]["passed"]
    assert type(models.load(str(tmp_path / "orth")).model) is WhisperForConditionalGeneration

    pairs = json.loads((tmp_path / "o.json").read_text())["pairs"]
    median = {kind: torch.tensor([p["singular_values"] for p in pairs if p["kind"] == kind]).median().item()
              for kind in ("qk", "vo")}
    code, out = run("prune", whisper_dir, "--out", tmp_path / "p", "--criterion", "clover", "--qk-threshold",
                    median["qk"], "--vo-threshold", median["vo"], "--json", tmp_path / "p.json")
    assert code == 0, out
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["allocation"] == "threshold" and report["params_after"] < report["params_before"]
    assert "cross 0-1" in out or "cross 0" in out
    pruned = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "p").eval()
    assert pruned.config.model_type == "clover_whisper"
    assert pruned.config.cross_qk_dims == [lr["qk_dim"] for lr in report["layers"] if lr["stack"] == "cross"]


@pytest.mark.skipif(not DATA, reason="WikiText-2 not found (set CLOVER_DATA)")
def test_cli_prune_whitened_calibrates_on_text_and_synthetic_audio(whisper_dir, tmp_path):
    code, out = run("prune", whisper_dir, "--out", tmp_path / "p", "--qk-ratio", 0.25, "--vo-ratio", 0.25,
                    "--calib-samples", 2, "--calib-seqlen", 48, "--json", tmp_path / "p.json")
    assert code == 0, out
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["vo_criterion"] == "whitened" and report["calibration_tokens"] == 96
    assert {lr["stack"] for lr in report["layers"]} == {"encoder", "decoder", "cross"}


def test_cli_prune_calibrates_the_encoder_with_user_features(whisper_dir, tmp_path):
    import numpy as np

    np.save(tmp_path / "feats.npy", np.stack([synthetic_log_mel(tiny_whisper().config, i).numpy() for i in range(2)]))
    code, out = run("prune", whisper_dir, "--out", tmp_path / "p", "--criterion", "clover", "--vo-ratio", 0.5,
                    "--calib-features", tmp_path / "feats.npy")
    assert code == 0, out
    code, out = run("prune", whisper_dir, "--out", tmp_path / "q", "--criterion", "clover", "--vo-ratio", 0.5,
                    "--calib-features", tmp_path / "feats.txt")
    assert code == 2 and ".pt or .npy" in out and not (tmp_path / "q").exists()
    torch.save(torch.zeros(2, MEL, 5), tmp_path / "bad.pt")
    code, out = run("prune", whisper_dir, "--out", tmp_path / "q", "--criterion", "clover", "--vo-ratio", 0.5,
                    "--calib-features", tmp_path / "bad.pt")
    assert code == 2 and "WhisperFeatureExtractor" in out and not (tmp_path / "q").exists()


def test_cli_inspect_names_the_stacks_and_eval_refuses_clearly(whisper_dir):
    code, out = run("inspect", whisper_dir)
    assert code == 0, out
    assert all(word in out for word in ("encoder", "decoder", "cross"))
    if DATA:
        code, out = run("eval", whisper_dir, "--seqlen", 32, "--max-windows", 1)
        assert code == 2 and "speech seq2seq" in out and "word error rate" in " ".join(out.split())


def test_modeling_file_is_self_contained_and_config_checks_dims():
    import ast
    from pathlib import Path

    from clover.modeling import clover_whisper

    tree = ast.parse(Path(clover_whisper.__file__).read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert roots <= {"__future__", "torch", "transformers", "huggingface_hub"}
    cfg = clover_whisper.CloverWhisperConfig(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                                             encoder_layers=2, decoder_layers=3, cross_vo_dims=[4, 5, 6])
    assert cfg.encoder_qk_dims == [16, 16] and cfg.decoder_vo_dims == [16] * 3 and cfg.cross_vo_dims == [4, 5, 6]
    with pytest.raises(ValueError, match="one per layer"):
        clover_whisper.CloverWhisperConfig(encoder_layers=2, encoder_qk_dims=[8])


# ---- by stack, and real audio for the encoder ----------------------------------------------------------------


def _dims(report):
    return {(lr.stack, lr.layer): (lr.qk_dim, lr.vo_dim) for lr in report.layers}


def test_stacks_are_pruned_each_by_its_own_amount():
    from clover.prune import StackPlan

    model = tiny_whisper()
    pruned, report = prune(model, PruneConfig(criterion="clover", progress=False, stacks={
        "encoder": StackPlan(vo_ratio=0.5), "cross": StackPlan(qk_ratio=0.25), "decoder": StackPlan(vo_threshold=0.0)}))
    dims = _dims(report)
    for layer in range(2):
        assert dims["encoder", layer] == (16, 8)  # 16 dims per head: V-O halved, Q-K untouched
        assert dims["cross", layer] == (12, 16)
        assert dims["decoder", layer] == (16, 16)  # threshold 0 keeps every non-zero direction: exact
    assert report.kv_bytes_per_token_after == report.kv_bytes_per_token_before  # decoder self-attention untouched
    _, only_encoder = prune(model, PruneConfig(criterion="clover", progress=False,
                                               stacks={"encoder": StackPlan(qk_ratio=0.5)}))
    assert {k: v for k, v in _dims(only_encoder).items() if k[0] != "encoder"} == {
        (s, i): (16, 16) for s in ("decoder", "cross") for i in range(2)}


def test_stack_errors_name_what_exists():
    from clover.prune import StackPlan

    with pytest.raises(CloverError, match="has the stacks encoder, decoder, cross"):
        prune(tiny_whisper(), PruneConfig(progress=False, stacks={"vision": StackPlan(vo_ratio=0.5)}))
    with pytest.raises(CloverError, match="one attention stack"):
        from conftest import tiny_llama
        prune(tiny_llama(), PruneConfig(progress=False, stacks={"encoder": StackPlan(vo_ratio=0.5)}))
    with pytest.raises(CloverError, match="drop --qk-ratio"):
        PruneConfig(vo_ratio=0.5, stacks={"encoder": StackPlan(vo_ratio=0.5)}).check()


def _speech_folder(folder):
    """Two short clips written with soundfile: a 16 kHz wav and a stereo 8 kHz flac (resampled when read)."""
    import numpy as np
    import soundfile

    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, rate, channels in (("a.wav", 16000, 1), ("b.flac", 8000, 2)):
        t = np.arange(int(0.4 * rate)) / rate
        wave = 0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 4 * t)) + 0.01 * rng.standard_normal(t.size)
        soundfile.write(folder / name, np.stack([wave] * channels, axis=1), rate)
    return folder


def test_calib_audio_reads_real_files_with_the_models_extractor(tmp_path):
    from transformers import WhisperFeatureExtractor

    from clover.audio import log_mel_from_folder

    model_dir = tmp_path / "whisper"
    tiny_whisper(vocab_size=300).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    extractor = WhisperFeatureExtractor(feature_size=MEL)
    extractor.save_pretrained(model_dir)
    audio = _speech_folder(tmp_path / "speech")
    config = tiny_whisper().config
    features = log_mel_from_folder(audio, str(model_dir), config)
    assert features.shape == (2, MEL, 2 * SOURCE) and torch.isfinite(features).all()
    import soundfile
    samples, _ = soundfile.read(audio / "a.wav", dtype="float32")
    want = extractor(samples, sampling_rate=16000, return_tensors="pt", padding="max_length",
                     max_length=2 * SOURCE * extractor.hop_length, truncation=True).input_features[0]
    assert torch.equal(features[0], want)  # exactly what the model's extractor makes of the file
    assert not torch.allclose(features[0], synthetic_log_mel(config, 0))
    if not DATA:
        return
    code, out = run("prune", model_dir, "--out", tmp_path / "p", "--criterion", "whitened", "--calib-audio", audio,
                    "--stack", "encoder:vo-ratio=0.5", "--stack", "cross:qk-ratio=0.25", "--calib-samples", 2,
                    "--calib-seqlen", 16, "--json", tmp_path / "p.json")
    assert code == 0, out
    layers = json.loads((tmp_path / "p.json").read_text())["layers"]
    assert {(lr["stack"], lr["qk_dim"], lr["vo_dim"]) for lr in layers} == {
        ("encoder", 16, 8), ("decoder", 16, 16), ("cross", 12, 16)}
    code, out = run("prune", model_dir, "--out", tmp_path / "q", "--calib-audio", tmp_path / "nothing",
                    "--stack", "encoder:vo-ratio=0.5", "--calib-samples", 2, "--calib-seqlen", 16)
    assert code == 2 and "is not a folder" in out and not (tmp_path / "q").exists()
    code, out = run("prune", model_dir, "--out", tmp_path / "q", "--stack", "encoder:vo=0.5")
    assert code == 2 and "unknown amount 'vo'" in out


def test_default_calib_seqlen_becomes_the_context_and_an_explicit_one_stays_an_error(whisper_dir, tmp_path):
    if not DATA:
        pytest.skip("WikiText-2 not found (set CLOVER_DATA)")
    code, out = run("prune", whisper_dir, "--out", tmp_path / "p", "--criterion", "whitened",
                    "--stack", "encoder:vo-ratio=0.5", "--calib-samples", 2, "--json", tmp_path / "p.json")
    assert code == 0, out
    assert "the default 512 is beyond the model's context of 64 tokens" in " ".join(out.split())
    assert any("calibration used 64-token windows" in n for n in json.loads((tmp_path / "p.json").read_text())["notes"])
    code, out = run("prune", whisper_dir, "--out", tmp_path / "q", "--criterion", "whitened",
                    "--stack", "encoder:vo-ratio=0.5", "--calib-samples", 2, "--calib-seqlen", 512)
    assert code == 2 and "--calib-seqlen 512 is beyond the model's context of 64 tokens" in out
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("clips,windows", [(3, 16), (8, 16), (5, 2)])
def test_every_clip_is_dealt_out_evenly(clips, windows):
    model = tiny_whisper()
    features = torch.stack([synthetic_log_mel(model.config, 100 + i) for i in range(clips)])
    ids = torch.randint(0, VOCAB, (windows, 12), generator=torch.Generator().manual_seed(0))
    uses = set_calibration_features(model, features, windows=ids)
    assert sum(uses) == windows
    if windows >= clips:  # every clip is heard, each by the same number of windows give or take one
        assert min(uses) >= 1 and max(uses) - min(uses) <= 1
    read = []
    adapter = adapter_for(model)
    for row in ids[torch.randperm(windows, generator=torch.Generator().manual_seed(1))]:  # order does not matter
        got = adapter.calibration_inputs(model, row[None])["input_features"][0]
        read.append(next(i for i in range(clips) if torch.equal(got, features[i])))
    assert sorted(read) == sorted(i for i, n in enumerate(uses) for _ in range(n))


def test_cli_hears_every_clip_even_with_fewer_windows_than_clips(tmp_path):
    if not DATA:
        pytest.skip("WikiText-2 not found (set CLOVER_DATA)")
    from transformers import WhisperFeatureExtractor

    model_dir = tmp_path / "whisper"
    tiny_whisper(vocab_size=300).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    WhisperFeatureExtractor(feature_size=MEL).save_pretrained(model_dir)
    audio = _speech_folder(tmp_path / "speech")  # two clips
    code, out = run("prune", model_dir, "--out", tmp_path / "p", "--criterion", "whitened", "--calib-audio", audio,
                    "--stack", "encoder:vo-ratio=0.5", "--calib-samples", 1, "--calib-seqlen", 16,
                    "--json", tmp_path / "p.json")
    assert code == 0, out
    report = json.loads((tmp_path / "p.json").read_text())
    assert any("--calib-samples 1 raised to 2" in n for n in report["notes"])
    assert [c["windows"] for c in report["calibration_audio"]] == [1, 1]
    # 0.4 s clips, of which the tiny encoder's window (2 x 16 frames of 160 samples at 16 kHz) holds 0.32 s
    assert [round(c["seconds"], 2) for c in report["calibration_audio"]] == [0.32, 0.32]
    assert any(n.startswith("calibration audio: 2 clips") for n in report["notes"])
