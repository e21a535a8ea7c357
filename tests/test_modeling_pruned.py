"""The pruned-model runtime (``clover.modeling.clover_gpt2`` / ``clover_bert``) on tiny random models.

Three kinds of check:
* with the default dims the clover classes are drop-in replacements: same state_dict keys and shapes, same outputs;
* with smaller dims they compute exactly what the original computes once the dropped channels are zeroed (which
  pins down the fused layout, the head-major channel order and the unchanged softmax scale), and the KV cache holds
  the pruned widths and decodes like a full forward;
* ``save_pretrained`` / ``from_pretrained`` round-trips.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

import clover  # noqa: F401  (registers the clover_* model types)
from clover.modeling import clover_bert, clover_gpt2, clover_latent_gpt2, clover_latent_llama
from clover.modeling.clover_bert import (
    CloverBertAttention,
    CloverBertConfig,
    CloverBertCrossAttention,
    CloverBertForMaskedLM,
    CloverBertModel,
    CloverBertSelfAttention,
)
from clover.modeling.clover_gpt2 import CloverGPT2Attention, CloverGPT2Config, CloverGPT2LMHeadModel, CloverGPT2Model

VOCAB, INIT, H, D = 128, 0.3, 4, 16  # 4 heads of 16 channels: hidden 64
QK, VO = [8, 12], [16, 4]
TOL = 1e-5  # relative to the reference output's largest magnitude


def _randomize_biases(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name.lower():
                p.copy_(torch.randn(p.shape, generator=gen) * INIT)
    return model


def _build(cls, config, seed=0):
    torch.manual_seed(seed)
    return _randomize_biases(cls(config).eval(), seed + 1)


def gpt2_config(**kw):
    return GPT2Config(n_layer=2, n_embd=H * D, n_head=H, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                      eos_token_id=0, initializer_range=INIT, **kw)


def bert_config(**kw):
    return BertConfig(num_hidden_layers=2, hidden_size=H * D, num_attention_heads=H, intermediate_size=128,
                      vocab_size=VOCAB, max_position_embeddings=128, initializer_range=INIT, pad_token_id=0, **kw)


def clover_config(cls, config, **dims):
    settings = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures",
                                                                        "transformers_version")}
    settings.update(dims)
    out = cls(**settings)
    out._attn_implementation = config._attn_implementation
    return out


def ids(batch=2, seqlen=10, seed=0):
    return torch.randint(1, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def states(batch=2, seqlen=6, seed=3):
    return torch.randn(batch, seqlen, H * D, generator=torch.Generator().manual_seed(seed))


def padded_mask(batch=2, seqlen=10):
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    mask[0, :3] = 0  # left padding on the first row
    return mask


def kept(width: int, keep: int) -> torch.Tensor:
    """Head-major channel indices of the first ``keep`` channels of each of the H heads."""
    return torch.cat([h * width + torch.arange(keep) for h in range(H)])


def max_diff(a, b):
    """Largest difference relative to the reference ``b``'s own scale, so the bound means the same on every CPU
    (kernels differ in summation order; an absolute bound on logits of scale ~8 does not)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---- GPT-2 helpers -------------------------------------------------------------------------------------------


def zero_and_slice_gpt2(ref, pruned, qk_dims, vo_dims, cross_qk=None, cross_vo=None):
    """Zero in ``ref`` the Q and V channels ``pruned`` drops; copy the rest (and everything else) into ``pruned``."""
    cross_qk, cross_vo = cross_qk or qk_dims, cross_vo or vo_dims
    own = pruned.state_dict()
    with torch.no_grad():
        for name, tensor in ref.state_dict().items():
            if name in own and own[name].shape == tensor.shape:
                own[name].copy_(tensor)
        for layer, (block, new) in enumerate(zip(ref.transformer.h, pruned.transformer.h, strict=True)):
            mods = [("attn", qk_dims[layer], vo_dims[layer])]
            if hasattr(block, "crossattention"):
                mods.append(("crossattention", cross_qk[layer], cross_vo[layer]))
            for attr, qk, vo in mods:
                a, b = getattr(block, attr), getattr(new, attr)
                hd = H * D
                drop_q = torch.ones(hd, dtype=torch.bool)
                drop_q[kept(D, qk)] = False
                drop_v = torch.ones(hd, dtype=torch.bool)
                drop_v[kept(D, vo)] = False
                if attr == "crossattention":  # q_attn: Q; c_attn: K | V
                    a.q_attn.weight[:, drop_q] = 0
                    a.q_attn.bias[drop_q] = 0
                    a.c_attn.weight[:, hd:][:, drop_v] = 0
                    a.c_attn.bias[hd:][drop_v] = 0
                    b.q_attn.weight.copy_(a.q_attn.weight[:, kept(D, qk)])
                    b.q_attn.bias.copy_(a.q_attn.bias[kept(D, qk)])
                    cols = torch.cat([kept(D, qk), hd + kept(D, vo)])
                else:  # c_attn: Q | K | V
                    a.c_attn.weight[:, :hd][:, drop_q] = 0
                    a.c_attn.bias[:hd][drop_q] = 0
                    a.c_attn.weight[:, 2 * hd:][:, drop_v] = 0
                    a.c_attn.bias[2 * hd:][drop_v] = 0
                    cols = torch.cat([kept(D, qk), hd + kept(D, qk), 2 * hd + kept(D, vo)])
                b.c_attn.weight.copy_(a.c_attn.weight[:, cols])
                b.c_attn.bias.copy_(a.c_attn.bias[cols])
                b.c_proj.weight.copy_(a.c_proj.weight[kept(D, vo), :])
                b.c_proj.bias.copy_(a.c_proj.bias)
    return ref, pruned


def gpt2_pair(qk_dims=QK, vo_dims=VO, cross_qk=None, cross_vo=None, **kw):
    """An original GPT-2 with the dropped channels zeroed, and the pruned model holding its kept channels."""
    ref = _build(GPT2LMHeadModel, gpt2_config(**kw))
    config = clover_config(CloverGPT2Config, ref.config, qk_dims=qk_dims, vo_dims=vo_dims, cross_qk_dims=cross_qk,
                           cross_vo_dims=cross_vo)
    return zero_and_slice_gpt2(ref, CloverGPT2LMHeadModel(config).eval(), qk_dims, vo_dims, cross_qk, cross_vo)


# ---- GPT-2: default dims are a drop-in replacement -----------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_gpt2_default_dims_load_original_and_match(attn, cross):
    ref = _build(GPT2LMHeadModel, gpt2_config(add_cross_attention=cross, attn_implementation=attn))
    config = clover_config(CloverGPT2Config, ref.config)
    assert config.qk_dims == config.vo_dims == [D, D]
    model = CloverGPT2LMHeadModel(config).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    assert all(isinstance(b.attn, CloverGPT2Attention) for b in model.transformer.h)
    if cross:
        assert all(isinstance(b.crossattention, CloverGPT2Attention) for b in model.transformer.h)
    kw = {"attention_mask": padded_mask()}
    if cross:
        kw.update(encoder_hidden_states=states(), encoder_attention_mask=torch.ones(2, 6, dtype=torch.long))
    with torch.no_grad():
        assert max_diff(model(ids(), **kw).logits, ref(ids(), **kw).logits) <= 1e-6


def test_gpt2_base_model_and_reorder_upcast_path():
    ref = _build(GPT2LMHeadModel, gpt2_config(reorder_and_upcast_attn=True, attn_implementation="eager"))
    base = CloverGPT2Model(clover_config(CloverGPT2Config, ref.config)).eval()
    base.load_state_dict(ref.transformer.state_dict(), strict=True)
    with torch.no_grad():
        assert max_diff(base(ids()).last_hidden_state, ref.transformer(ids()).last_hidden_state) <= 1e-6
    ref, pruned = gpt2_pair(reorder_and_upcast_attn=True, attn_implementation="eager")
    with torch.no_grad():
        assert max_diff(pruned(ids()).logits, ref(ids()).logits) < TOL


# ---- GPT-2: pruned dims --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_pruned_shapes_scale_and_outputs(attn):
    ref, pruned = gpt2_pair(scale_attn_by_inverse_layer_idx=True, attn_implementation=attn)
    for layer, (a, b) in enumerate(zip(ref.transformer.h, pruned.transformer.h, strict=True)):
        assert (b.attn.qk_dim, b.attn.vo_dim) == (QK[layer], VO[layer])
        assert b.attn.c_attn.weight.shape == (H * D, H * (2 * QK[layer] + VO[layer]))
        assert b.attn.c_proj.weight.shape == (H * VO[layer], H * D)
        assert b.attn.scaling == a.attn.scaling == 1 / math.sqrt(D) / (layer + 1)
    # The zeroed original and the pruned model agree: same layout, same (original) softmax scale.
    with torch.no_grad():
        got = pruned(ids(), attention_mask=padded_mask()).logits
        want = ref(ids(), attention_mask=padded_mask()).logits
    assert max_diff(got, want) < TOL
    # ...and differ clearly from a model that (wrongly) rescaled by 1/sqrt(qk_dim)
    for block in pruned.transformer.h:
        block.attn.scaling = block.attn.qk_dim ** -0.5
    with torch.no_grad():
        assert max_diff(pruned(ids(), attention_mask=padded_mask()).logits, want) > 1e-2


def test_gpt2_pruned_cache_and_greedy_generate():
    ref, model = gpt2_pair()
    prompt = ids(2, 5, seed=4)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        for layer in range(2):
            assert cache.layers[layer].keys.shape == (2, H, 5, QK[layer])
            assert cache.layers[layer].values.shape == (2, H, 5, VO[layer])

        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
        seq = prompt
        for _ in range(8):  # step by step, no cache, full forward each time
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(generated, seq)
        # incremental decoding with the cache gives the logits of a full forward
        full = model(seq, use_cache=False).logits
        step = model(seq[:, :5], use_cache=True)
        cache, logits = step.past_key_values, [step.logits]
        for t in range(5, seq.shape[1]):
            step = model(seq[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            logits.append(step.logits)
        assert max_diff(torch.cat(logits, dim=1), full) < TOL
        assert cache.layers[1].values.shape[-1] == VO[1]
        assert max_diff(full, ref(seq).logits) < TOL


def test_gpt2_pruned_cross_attention_with_cache():
    cross = {"cross_qk_dims": [4, 16], "cross_vo_dims": [12, 8]}
    ref, model = gpt2_pair(cross_qk=cross["cross_qk_dims"], cross_vo=cross["cross_vo_dims"], add_cross_attention=True)
    for layer, block in enumerate(model.transformer.h):
        att = block.crossattention
        assert (att.qk_dim, att.vo_dim) == (cross["cross_qk_dims"][layer], cross["cross_vo_dims"][layer])
        assert att.q_attn.weight.shape == (H * D, H * att.qk_dim)
        assert att.c_attn.weight.shape == (H * D, H * (att.qk_dim + att.vo_dim))
        assert att.c_proj.weight.shape == (H * att.vo_dim, H * D)
        assert att.scaling == block.attn.scaling == D ** -0.5
    enc, enc_mask = states(), torch.ones(2, 6, dtype=torch.long)
    enc_mask[1, -2:] = 0
    seq = ids(2, 9, seed=5)
    kw = {"encoder_hidden_states": enc, "encoder_attention_mask": enc_mask}
    with torch.no_grad():
        full = model(seq, use_cache=False, **kw).logits
        assert max_diff(full, ref(seq, **kw).logits) < TOL
        step = model(seq[:, :6], use_cache=True, **kw)
        cache, logits = step.past_key_values, [step.logits]
        for t in range(6, 9):
            step = model(seq[:, t:t + 1], past_key_values=cache, use_cache=True, **kw)
            cache, logits = step.past_key_values, logits + [step.logits]
        assert max_diff(torch.cat(logits, dim=1), full) < TOL
        for layer in range(2):
            assert cache.self_attention_cache.layers[layer].keys.shape[-1] == QK[layer]
            assert cache.self_attention_cache.layers[layer].values.shape[-1] == VO[layer]
            assert cache.cross_attention_cache.layers[layer].keys.shape == (2, H, 6, cross["cross_qk_dims"][layer])
            assert cache.cross_attention_cache.layers[layer].values.shape == (2, H, 6, cross["cross_vo_dims"][layer])


def test_gpt2_save_and_load_round_trip(tmp_path):
    _, model = gpt2_pair()
    model.save_pretrained(tmp_path)
    for loaded in (CloverGPT2LMHeadModel.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        loaded.eval()
        assert type(loaded) is CloverGPT2LMHeadModel
        assert (loaded.config.qk_dims, loaded.config.vo_dims) == (QK, VO)
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
        with torch.no_grad():
            assert torch.equal(loaded(ids()).logits, model(ids()).logits)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "clover_gpt2"


# ---- BERT helpers --------------------------------------------------------------------------------------------


def zero_and_slice_bert(ref, pruned, qk_dims, vo_dims):
    """As ``zero_and_slice_gpt2``, for a BertModel or a model holding one in ``.bert``."""
    own = pruned.state_dict()
    with torch.no_grad():
        for name, tensor in ref.state_dict().items():
            if name in own and own[name].shape == tensor.shape:
                own[name].copy_(tensor)
        layers = zip(getattr(ref, "bert", ref).encoder.layer, getattr(pruned, "bert", pruned).encoder.layer,
                     strict=True)
        for layer, (a_layer, b_layer) in enumerate(layers):
            qk, vo = qk_dims[layer], vo_dims[layer]
            pairs = [(a_layer.attention, b_layer.attention)]
            if hasattr(a_layer, "crossattention"):
                pairs.append((a_layer.crossattention, b_layer.crossattention))
            for a, b in pairs:
                for lin, keep in ((a.self.query, qk), (a.self.value, vo)):
                    drop = torch.ones(H * D, dtype=torch.bool)
                    drop[kept(D, keep)] = False
                    lin.weight[drop] = 0
                    lin.bias[drop] = 0
                for name, keep in (("query", qk), ("key", qk), ("value", vo)):
                    getattr(b.self, name).weight.copy_(getattr(a.self, name).weight[kept(D, keep)])
                    getattr(b.self, name).bias.copy_(getattr(a.self, name).bias[kept(D, keep)])
                b.output.dense.weight.copy_(a.output.dense.weight[:, kept(D, vo)])
    return ref, pruned


# ---- BERT ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_masked_lm_default_dims_load_original_and_match(attn):
    ref = _build(BertForMaskedLM, bert_config(attn_implementation=attn))
    model = CloverBertForMaskedLM(clover_config(CloverBertConfig, ref.config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    assert model.bert.pooler is None
    with torch.no_grad():
        assert max_diff(model(ids(), attention_mask=padded_mask()).logits,
                        ref(ids(), attention_mask=padded_mask()).logits) <= 1e-6


def bert_decoder(attn="sdpa"):
    return _build(BertModel, bert_config(is_decoder=True, add_cross_attention=True, attn_implementation=attn))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_decoder_with_cross_attention_default_dims(attn):
    ref = bert_decoder(attn)
    model = CloverBertModel(clover_config(CloverBertConfig, ref.config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    layer = model.encoder.layer[0]
    assert isinstance(layer.attention, CloverBertAttention) and isinstance(layer.crossattention, CloverBertAttention)
    assert isinstance(layer.attention.self, CloverBertSelfAttention)
    assert isinstance(layer.crossattention.self, CloverBertCrossAttention)
    kw = {"encoder_hidden_states": states(), "encoder_attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with torch.no_grad():
        got, want = model(ids(), use_cache=False, **kw), ref(ids(), use_cache=False, **kw)
    assert max_diff(got.last_hidden_state, want.last_hidden_state) <= 1e-6
    assert max_diff(got.pooler_output, want.pooler_output) <= 1e-6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_masked_lm_pruned(attn):
    ref = _build(BertForMaskedLM, bert_config(attn_implementation=attn))
    model = CloverBertForMaskedLM(clover_config(CloverBertConfig, ref.config, qk_dims=QK, vo_dims=VO)).eval()
    zero_and_slice_bert(ref, model, QK, VO)
    for layer, (a, b) in enumerate(zip(ref.bert.encoder.layer, model.bert.encoder.layer, strict=True)):
        s = b.attention.self
        assert (s.qk_dim, s.vo_dim) == (QK[layer], VO[layer])
        assert s.query.weight.shape == s.key.weight.shape == (H * QK[layer], H * D)
        assert s.value.weight.shape == (H * VO[layer], H * D)
        assert b.attention.output.dense.weight.shape == (H * D, H * VO[layer])
        assert s.scaling == a.attention.self.scaling == D ** -0.5
    with torch.no_grad():
        assert max_diff(model(ids(), attention_mask=padded_mask()).logits,
                        ref(ids(), attention_mask=padded_mask()).logits) < TOL


def test_bert_decoder_pruned_cross_attention_and_cache():
    ref = bert_decoder()
    model = CloverBertModel(clover_config(CloverBertConfig, ref.config, qk_dims=QK, vo_dims=VO)).eval()
    zero_and_slice_bert(ref, model, QK, VO)
    cross = model.encoder.layer[1].crossattention
    assert (cross.self.qk_dim, cross.self.vo_dim) == (QK[1], VO[1])
    assert cross.output.dense.weight.shape == (H * D, H * VO[1])
    enc, enc_mask = states(), torch.ones(2, 6, dtype=torch.long)
    enc_mask[0, -1] = 0
    seq = ids(2, 9, seed=6)
    kw = {"encoder_hidden_states": enc, "encoder_attention_mask": enc_mask}
    with torch.no_grad():
        full = model(seq, use_cache=False, **kw).last_hidden_state
        assert max_diff(full, ref(seq, use_cache=False, **kw).last_hidden_state) < TOL
        step = model(seq[:, :6], use_cache=True, **kw)
        cache, hidden = step.past_key_values, [step.last_hidden_state]
        for t in range(6, 9):
            step = model(seq[:, t:t + 1], past_key_values=cache, use_cache=True, **kw)
            cache, hidden = step.past_key_values, hidden + [step.last_hidden_state]
    assert max_diff(torch.cat(hidden, dim=1), full) < TOL
    for layer in range(2):
        assert cache.self_attention_cache.layers[layer].keys.shape == (2, H, 9, QK[layer])
        assert cache.self_attention_cache.layers[layer].values.shape == (2, H, 9, VO[layer])
        assert cache.cross_attention_cache.layers[layer].values.shape == (2, H, 6, VO[layer])


def test_bert_save_and_load_round_trip(tmp_path):
    ref = _build(BertForMaskedLM, bert_config())
    model = CloverBertForMaskedLM(clover_config(CloverBertConfig, ref.config, qk_dims=QK, vo_dims=VO)).eval()
    zero_and_slice_bert(ref, model, QK, VO)
    model.save_pretrained(tmp_path)
    for loaded in (CloverBertForMaskedLM.from_pretrained(tmp_path), AutoModelForMaskedLM.from_pretrained(tmp_path)):
        loaded.eval()
        assert type(loaded) is CloverBertForMaskedLM
        assert (loaded.config.qk_dims, loaded.config.vo_dims) == (QK, VO)
        with torch.no_grad():
            assert torch.equal(loaded(ids()).logits, model(ids()).logits)


# ---- both ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [clover_gpt2, clover_bert, clover_latent_llama, clover_latent_gpt2],
                         ids=["gpt2", "bert", "latent_llama", "latent_gpt2"])
def test_modeling_file_is_self_contained(module):
    """The file is copied next to checkpoints for trust_remote_code: it may import torch/transformers only."""
    tree = ast.parse(Path(module.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "torch", "transformers", "huggingface_hub"}
    assert set(module.CLASSES) >= {"config", "base"}


@pytest.mark.parametrize("cls, field", [(CloverGPT2Config, "n_layer"), (CloverBertConfig, "num_hidden_layers")])
def test_config_rejects_wrong_number_of_dims(cls, field):
    with pytest.raises(ValueError, match="one per layer"):
        cls(**{field: 2, "qk_dims": [8]})
