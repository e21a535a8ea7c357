"""Stable Diffusion (XL) UNets: tiny random ``UNet2DConditionModel``s from diffusers configs, offline and seeded.

Self- and cross-attention, Q-K and V-O: the rewrite is exact, pruning shrinks every block with each criterion,
a pruned UNet at full rank denoises exactly like the orthogonalized one, keeps the original softmax scale,
survives a save/load round trip, and a UNet with a processor clover does not understand is refused untouched.
"""

import copy
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import clover  # noqa: E402
from clover.adapters import adapter_for  # noqa: E402
from clover.errors import CloverError  # noqa: E402
from clover.modeling.clover_unet import CloverAttnProcessor, load_pruned_unet, save_pruned_unet  # noqa: E402
from clover.orthogonalize import OrthogonalizeConfig, orthogonalize_  # noqa: E402
from clover.pairs import factors  # noqa: E402
from clover.prune import PruneConfig, kv_bytes_per_token, prune  # noqa: E402
from clover.verify import model_outputs  # noqa: E402

QUIET = OrthogonalizeConfig(progress=False)
CALIB = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(0))
INIT = 0.3  # large on purpose: with small weights attention is nearly uniform and a broken Q-K would hide

BASE = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
            transformer_layers_per_block=1, sample_size=8, norm_num_groups=8)
VARIANTS = {
    # SD 1.x-like: cross-attention down block, plain up block, cross-attention mid block (head dims 4 and 8).
    "sd": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL-like: text_time micro-conditioning, linear projections, two transformer layers in the deeper block.
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
    # Attention down/up blocks: Q/K/V biases, a group norm on the input, a residual and output rescaling.
    "attn-blocks": dict(down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D")),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions are ~50x slower with two threads on a busy two-core machine; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(variant: str = "sdxl", seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**BASE, **VARIANTS[variant]}).eval()
    with torch.no_grad():  # large attention weights and random biases (diffusers zero-initialises some)
        for site in adapter_for(unet).sites(unet):
            for layer in adapter_for(unet).projections(site).values():
                layer.weight.normal_(0, INIT / 2 if layer is site.module.to_out[0] else INIT)
                if layer.bias is not None:
                    layer.bias.normal_(0, INIT)
    return unet


def _inputs(unet, seed=1):
    return adapter_for(unet).example_inputs(unet, batch=2, seqlen=6, seed=seed)


def _relative(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _products(unet):
    adapter = adapter_for(unet)
    out = {}
    for site in adapter.sites(unet):
        w = adapter.read(site)
        for kind in ("qk", "vo"):
            left, right = factors(w, kind)
            out[site.name, kind] = left.double() @ right.double().mT
    return out


def _denoising_step(unet, inputs):
    """One Euler step of SDXL's default scheduler from the example latents."""
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    latents = inputs["sample"]
    kwargs = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    with torch.no_grad():
        noise = unet(scheduler.scale_model_input(latents, t), t, **kwargs).sample
    return scheduler.step(noise, t, latents).prev_sample


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_orthogonalize_is_exact_for_self_and_cross_attention(variant):
    unet = tiny_unet(variant)
    inputs = _inputs(unet)
    before, products = model_outputs(unet, inputs), _products(unet)
    report = orthogonalize_(unet, QUIET)
    assert report.model_type == "UNet2DConditionModel" and report.adapter == "unet"
    roles = {(p.role, p.kind) for p in report.pairs if p.status == "rewritten"}
    assert roles == {("self", "qk"), ("self", "vo"), ("cross", "qk"), ("cross", "vo")}
    assert report.check.passed
    for key, product in _products(unet).items():
        assert (product - products[key]).abs().max() <= 1e-5 * products[key].abs().max(), key
    assert _relative(model_outputs(unet, inputs), before) <= 1e-4  # fp32 rounding of the rewritten weights
    for pair in report.pairs:  # sorted, so the tail is what pruning drops
        for s in pair.singular_values:
            assert s == sorted(s, reverse=True)
    # Attention really shapes the output here: dropping one cross-attention's Q-K changes it a lot.
    cross = next(s for s in adapter_for(unet).sites(unet) if s.role == "cross")
    with torch.no_grad():
        cross.module.to_q.weight.zero_()
    assert _relative(model_outputs(unet, inputs), before) > 1e-2


@pytest.mark.parametrize("criterion", ["vanilla", "clover", "whitened"])
def test_prune_shrinks_every_block_with_each_criterion(criterion):
    unet = tiny_unet("sdxl")
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    pruned, report = prune(unet, PruneConfig(criterion=criterion, qk_ratio=0.5, vo_ratio=0.25,
                                             calibration=CALIB, progress=False))
    adapter = adapter_for(pruned)
    sites = adapter.sites(pruned)
    assert {s.role for s in sites} == {"self", "cross"}
    before = {lr.site: (lr.qk_before, lr.vo_before) for lr in report.layers}
    for site in sites:
        w = adapter.read(site)
        qk, vo = before[site.name]
        assert (w.qk_dim, w.vo_dim) == (qk - qk // 2, vo - round(vo * 0.25))
        assert site.module.to_q.weight.shape[0] == site.num_heads * w.qk_dim < site.num_heads * qk
        assert site.module.to_out[0].weight.shape[1] == site.num_heads * w.vo_dim < site.num_heads * vo
        assert type(site.module.processor) is CloverAttnProcessor
    assert report.params_after < report.params_before == sum(p.numel() for p in unet.parameters())
    assert report.kv_bytes_per_token_before == report.kv_bytes_per_token_after == kv_bytes_per_token(pruned) == 0
    assert report.calibration_tokens == (CALIB.numel() if criterion == "whitened" else 0)
    assert torch.isfinite(model_outputs(pruned, _inputs(pruned))).all()
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())  # input untouched


def test_global_allocation_spends_one_budget_over_blocks_of_different_widths():
    unet = tiny_unet("sd")  # head widths 4 (outer blocks) and 8 (mid block)
    pruned, report = prune(unet, PruneConfig(criterion="whitened", vo_whitening="input", qk_ratio=0.5,
                                             vo_ratio=0.5, allocation="global", calibration=CALIB, progress=False))
    assert len({lr.qk_before for lr in report.layers}) == 2
    for kind in ("qk", "vo"):
        before = sum(getattr(lr, f"{kind}_before") for lr in report.layers)
        after = sum(getattr(lr, f"{kind}_dim") for lr in report.layers)
        assert after == before - before // 2
    assert torch.isfinite(model_outputs(pruned, _inputs(pruned))).all()


def test_rotary_criteria_are_refused_on_a_unet():
    with pytest.raises(CloverError, match="rotary embeddings only"):
        prune(tiny_unet("sd"), PruneConfig(qk_criterion="rotary-weight", qk_ratio=0.5, progress=False))


def test_denoising_step_of_full_rank_prune_matches_orthogonalized_unet():
    orthogonal = tiny_unet("sdxl")
    orthogonalize_(orthogonal, QUIET)
    # Threshold 0 keeps every direction but still runs the whole pruning path (ranks, rebuild, processor).
    pruned, report = prune(orthogonal, PruneConfig(qk_threshold=0.0, vo_threshold=0.0, progress=False))
    assert all((lr.qk_dim, lr.vo_dim) == (lr.qk_before, lr.vo_before) for lr in report.layers)
    inputs = _inputs(orthogonal)
    want = _denoising_step(orthogonal, inputs)
    assert _relative(_denoising_step(pruned, inputs), want) <= 1e-5
    assert not torch.allclose(want, inputs["sample"], atol=1e-3)  # the step really moved the latents


def _zero_tail_(unet, keep: dict[str, tuple[int, int]]):
    """Zero every head's Q/K dims past ``qk`` and V/O dims past ``vo``: in the orthogonal basis this is exactly
    the rank truncation pruning performs, at the original widths and the stock processor."""
    adapter = adapter_for(unet)
    with torch.no_grad():
        for site in adapter.sites(unet):
            qk, vo = keep[site.name]
            m, heads = site.module, site.num_heads
            for layer, width in ((m.to_q, qk), (m.to_k, qk), (m.to_v, vo)):
                rows = layer.weight.view(heads, -1, layer.weight.shape[1])
                rows[:, width:] = 0
                if layer.bias is not None:
                    layer.bias.view(heads, -1)[:, width:] = 0
            m.to_out[0].weight.view(m.to_out[0].weight.shape[0], heads, -1)[:, :, vo:] = 0


@pytest.mark.parametrize("variant", ["sd", "attn-blocks"])
def test_pruned_unet_keeps_the_original_softmax_scale(variant):
    orthogonal = tiny_unet(variant)
    orthogonalize_(orthogonal, QUIET)
    pruned, report = prune(orthogonal, PruneConfig(criterion="clover", qk_ratio=0.5, vo_ratio=0.5, progress=False))
    truncated = copy.deepcopy(orthogonal)
    _zero_tail_(truncated, {lr.site: (lr.qk_dim, lr.vo_dim) for lr in report.layers})
    inputs = _inputs(orthogonal)
    want = model_outputs(truncated, inputs)
    assert _relative(model_outputs(pruned, inputs), want) <= 1e-4  # fp32 rounding
    assert _relative(model_outputs(orthogonal, inputs), want) > 1e-3  # the truncation did change the function
    # The stock processor would take its scale from the pruned width: refused rather than silently wrong.
    pruned.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(CloverError, match="wrong softmax scale"):
        adapter_for(pruned).sites(pruned)


def test_save_load_round_trip_is_identical(tmp_path):
    pruned, report = prune(tiny_unet("sdxl"), PruneConfig(qk_ratio=0.5, vo_ratio=0.25, progress=False))
    out = save_pruned_unet(pruned, tmp_path / "unet", report=report.to_dict())
    assert (out / "clover_dims.json").is_file() and (out / "clover_report.json").is_file()
    loaded = clover.load_pruned_unet(out)
    assert loaded.clover_dims == pruned.clover_dims
    assert all(type(p) is CloverAttnProcessor for p in loaded.attn_processors.values())
    inputs = _inputs(pruned)
    assert torch.equal(model_outputs(loaded, inputs), model_outputs(pruned, inputs))
    assert sum(p.numel() for p in loaded.parameters()) == report.params_after
    # A plain diffusers load cannot silently half-load it: the weights do not fit the stock shapes.
    with pytest.raises((ValueError, RuntimeError), match="size"):
        UNet2DConditionModel.from_pretrained(out)
    # Half-precision checkpoints come back in their own dtype, bit for bit.
    half = save_pruned_unet(pruned.to(torch.bfloat16), tmp_path / "bf16")
    loaded = load_pruned_unet(half)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_save_and_load_refuse_what_is_not_a_pruned_unet(tmp_path):
    unet = tiny_unet("sd")
    with pytest.raises(CloverError, match="not pruned by clover"):
        save_pruned_unet(unet, tmp_path / "x")
    assert not any(tmp_path.iterdir())  # nothing half-written
    unet.save_pretrained(tmp_path / "stock")
    with pytest.raises(CloverError, match="not a pruned clover UNet"):
        load_pruned_unet(tmp_path / "stock")


class ScaledProcessor(AttnProcessor2_0):
    """A user's custom processor: clover cannot know what it computes."""


def test_custom_processor_is_refused_and_nothing_is_rewritten():
    unet = tiny_unet("sdxl")
    name = next(n for n in unet.attn_processors if "attn2" in n)
    unet.set_attn_processor({n: (ScaledProcessor() if n == name else AttnProcessor2_0())
                             for n in unet.attn_processors})
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    for action in (lambda: orthogonalize_(unet, QUIET), lambda: prune(unet, PruneConfig(qk_ratio=0.5))):
        with pytest.raises(CloverError, match=r"uses attention processor ScaledProcessor.*AttnProcessor2_0"):
            action()
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())
    unet.set_attn_processor(AttnProcessor2_0())  # the fix the message names
    orthogonalize_(unet, QUIET)


def test_other_unet_variants_get_a_clear_error():
    unet = tiny_unet("sd")
    unet.fuse_qkv_projections()
    with pytest.raises(CloverError, match="FusedAttnProcessor2_0"):
        orthogonalize_(unet, QUIET)
    class_conditioned = UNet2DConditionModel(**{**BASE, **VARIANTS["sd"]}, class_embed_type="timestep")
    with pytest.raises(CloverError, match="class-conditioned"):
        orthogonalize_(class_conditioned, QUIET)


# --- the `clover` command on UNet directories (diffusers save_pretrained layout) ---

cli_runner = CliRunner()


def _cli(*args):
    from clover.cli import app

    result = cli_runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet") / "sdxl"
    tiny_unet("sdxl").save_pretrained(path)
    return path


def test_cli_inspect_reads_a_diffusers_unet_folder(unet_dir, tmp_path):
    code, out = _cli("inspect", unet_dir, "--json", tmp_path / "s.json")
    assert code == 0, out
    pairs = json.loads((tmp_path / "s.json").read_text())["pairs"]
    unet = tiny_unet("sdxl")
    sites = {s.name for s in adapter_for(unet).sites(unet)}
    assert {(p["site"], p["kind"]) for p in pairs} == {(s, k) for s in sites for k in ("qk", "vo")}


def test_cli_orthogonalize_saves_a_stock_reloadable_unet(unet_dir, tmp_path):
    code, out = _cli("orthogonalize", unet_dir, "--out", tmp_path / "orth")
    assert code == 0, out
    assert "PASSED" in out
    assert not (tmp_path / "orth" / "clover_dims.json").exists() and (tmp_path / "orth" / "clover_report.json").exists()
    original = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    rewritten = UNet2DConditionModel.from_pretrained(tmp_path / "orth").eval()
    inputs = _inputs(original)
    assert _relative(model_outputs(rewritten, inputs), model_outputs(original, inputs)) <= 1e-4


@pytest.mark.parametrize("criterion", ["clover", "whitened"])
def test_cli_prune_saves_what_load_pruned_unet_reloads_identically(unet_dir, tmp_path, criterion, monkeypatch):
    monkeypatch.delenv("CLOVER_DATA", raising=False)  # a UNet's calibration reads no corpus
    code, out = _cli("prune", unet_dir, "--out", tmp_path / "pruned", "--qk-ratio", 0.5, "--vo-ratio", 0.25,
                     "--criterion", criterion, "--calib-samples", 3, "--calib-seqlen", 8, "--json", tmp_path / "r.json")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration_tokens"] == (24 if criterion == "whitened" else 0)
    loaded = load_pruned_unet(tmp_path / "pruned")
    # The same prune in memory, with the ids the CLI drew: the saved folder holds exactly that model.
    calibration = torch.randint(0, 2**15, (3, 8), generator=torch.Generator().manual_seed(0))
    pruned, _ = prune(UNet2DConditionModel.from_pretrained(unet_dir).eval(),
                      PruneConfig(criterion=criterion, qk_ratio=0.5, vo_ratio=0.25, calibration=calibration,
                                  progress=False))
    assert loaded.clover_dims == pruned.clover_dims
    assert {lr["qk_dim"] for lr in report["layers"]} == {4}
    inputs = _inputs(pruned)
    assert torch.equal(model_outputs(loaded, inputs), model_outputs(pruned, inputs))
    # A pruned folder is itself a model the CLI reads.
    code, out = _cli("orthogonalize", tmp_path / "pruned", "--out", tmp_path / "again")
    assert code == 0 and "PASSED" in out, out
    assert load_pruned_unet(tmp_path / "again").clover_dims == pruned.clover_dims


def test_cli_refuses_perplexity_on_a_unet(unet_dir, tmp_path):
    for args in (("eval", unet_dir), ("sweep", unet_dir),
                 ("prune", unet_dir, "--out", tmp_path / "p", "--criterion", "clover", "--qk-ratio", 0.5,
                  "--eval-ppl")):
        code, out = _cli(*args)
        assert code == 2 and "needs a language model" in out and "Traceback" not in out, out
    assert not (tmp_path / "p").exists()


def test_cli_names_the_unet_folder_of_a_pipeline_and_refuses_streaming(unet_dir, tmp_path):
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    code, out = _cli("inspect", pipeline)
    assert code == 2 and "pass its UNet folder" in out, out
    code, out = _cli("prune", unet_dir, "--out", tmp_path / "p", "--stream", "--criterion", "clover",
                     "--vo-ratio", "0.25")
    assert code == 2 and "drop --stream" in out, out
