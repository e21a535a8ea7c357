"""The math of one layer's MLA conversion, with no model knowledge (float64, no biases).

A LLaMA-family layer has H query heads in G KV groups of head width d under RoPE (rotate-half layout). Per
frequency f, RoPE multiplies every key's complex channel ``z_g,f = k_g[f] + i k_g[f + d/2]`` by the same phase,
so any complex mix of the G channels commutes with it. A query-weighted PCA of the G channels per frequency
(``lowrank.rotary_components``) gives G components ``c_j,f``; head h of group g scores

    Re(q~_h,f conj(z_g,f) e^{i theta (m - n)}) = sum_j Re(p_h,j,f conj(c_j,f) e^{i theta (m - n)}),
    p_h,j,f = q~_h,f conj(decode[f, g, j]).

The MLA format has one rotated key shared by all heads: component 0 of every kept frequency is that key (exact
under RoPE; ``rope_dims`` below ``d`` keeps ``rope_dims / 2`` frequencies, evenly stepped from the fastest, which
the engine's own rotary embedding computes with one theta, ``engine_theta``). The other components have no rotated
place: they attend without rotation (the only error at full rank; ``rotation.py`` chooses the complex factor folded
into their queries) and join the values in one joint latent ``z`` (whitened by the attention inputs, key rows
weighted by the query energy that reads them, value rows by the O blocks that read them, ``split`` trading one
against the other), decoded per head by ``kv_b``. Which component is shared is the ``rope_key`` lever: the keys'
own PCA (TransMLA), weighted by the query energy reading each KV head, or additionally by the attention each key
position receives. Ranks: ``qk_nope_head_dim = 2 (G F - F_kept)`` (every head reads every unrotated component),
full latent that plus ``G d``; the cache holds ``kv_lora_rank + rope_dims`` numbers per token against ``2 G d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lowrank import channel_energy, complex_channels, joint_lowrank, refit_readout, rotary_components, sym_sqrt, \
    weighted_lowrank
from . import rotation
from .attention import LayerAttention
from .freqfold import folded_maps


@dataclass
class LayerMla:
    """One layer in MLA form; every map acts on the attention input x (rows: ``y = x @ map``).

    q_nope: (H, D, n_nope), q_rope: (H, D, d) interleaved pairs; k_rope: (D, d) interleaved; down: (D, r) the
    latent; up_k: (r, n_nope) shared by all heads; up_v: (G, r, d); o: (D_out, H d) unchanged.
    """

    q_nope: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    down: torch.Tensor
    up_k: torch.Tensor
    up_v: torch.Tensor
    o: torch.Tensor
    kept_energy: float  # share of the joint latent's weighted energy kept at this rank
    rope_energy: float  # share of the key energy (query-weighted) in the shared rotated component
    rope_freqs: torch.Tensor  # the original frequencies the shared key turns by (``rotated_frequencies``)

    @property
    def group(self) -> int:
        return self.q_nope.shape[0] // self.up_v.shape[0]


@dataclass
class LayerParts:
    """Everything but the rank: the rotary split and the joint latent's full decomposition."""

    q_nope: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    target: torch.Tensor  # (D, n_nope + G d): the unrotated key components, then every group's values
    chol: torch.Tensor
    key_root: torch.Tensor  # (n_nope, n_nope) sqrt of the query energy reading each unrotated component
    value_root: torch.Tensor  # (G d, G d) block diagonal: sqrt of each group's O Gram
    o: torch.Tensor
    rope_energy: float
    rope_freqs: torch.Tensor  # the original frequencies the shared key turns by (``rotated_frequencies``)
    balance: float = 1.0  # per-layer factor on the key rows' weight (BKV's key/value energy balance; 1 otherwise)
    mixed: torch.Tensor | None = None  # (H, D, D) attention-mixed input moments: refit O to the latent's values
    value_moment: torch.Tensor | None = None  # (D, D) what prices value errors, if not the input moment


def interleave(z: torch.Tensor) -> torch.Tensor:
    """(..., F) complex -> (..., 2F) real as (re_0, im_0, re_1, im_1, ...): the engines' rope layout."""
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def key_weight(q: torch.Tensor, cov: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """(G, F): sqrt of the query energy each KV head's frequency serves (the rotary PCA's weights)."""
    energy = channel_energy(q, cov, heads, head_dim).reshape(kv_heads, heads // kv_heads, -1).sum(1)
    return energy.clamp_min(1e-12 * energy.max().clamp_min(1e-300)).sqrt()


def value_root(o: torch.Tensor, kv_heads: int, group: int, head_dim: int, groups: list[int]) -> torch.Tensor:
    """Block diagonal over ``groups``: sqrt of each group's O Gram (sum over its heads of W_o^T W_o), the cost of a
    value error."""
    blocks = o.reshape(o.shape[0], kv_heads, group, head_dim)[:, groups]
    gram = torch.einsum("ogad,ogae->gde", blocks, blocks)
    return torch.block_diag(*(sym_sqrt(g)[0] for g in gram))


@dataclass
class RotarySettings:
    """The rotary levers of one conversion (``MlaConfig`` fields of the same names, ``rotation.py``)."""

    rope_key: str = "query"  # pca | query | attention: how each frequency's shared rotated component is chosen
    unrotated: str = "nope"  # nope | expected | refit: what the components without a rotated place keep
    rope_dims: int | None = None  # rotated dims of the shared key (None: head_dim)
    rope_frequencies: str = "fastest"  # fastest | spread: which rope_dims / 2 frequencies (``rotated_frequencies``)
    latent_weights: str = "clover"  # clover (query / O weighted) | bkv (plain, key and value energy balanced)
    freqfold: int = 1  # neighbouring frequencies sharing one PCA (TransMLA's FreqFold; 1: none)
    o_refit: bool = False  # refit each head's O block to the latent's values on attention-mixed inputs
    value_moment: str = "input"  # input | mixed: the moment that prices value errors in the joint latent


def split_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, cov: torch.Tensor,
                heads: int, kv_heads: int, head_dim: int, chol: torch.Tensor,
                settings: RotarySettings | None = None, attention: LayerAttention | None = None,
                inv_freq: torch.Tensor | None = None) -> LayerParts:
    """``q``/``k``/``v``: (D, H d) / (D, G d) / (D, G d) maps; ``o``: (D_out, H d); ``cov``: input second moment.
    ``attention`` (the original attention's statistics) and ``inv_freq`` are needed by the attention-reading levers."""
    settings = settings or RotarySettings()
    group = heads // kv_heads
    freqs = rotated_frequencies(head_dim, settings.rope_dims, settings.rope_frequencies)
    if settings.freqfold > 1:  # TransMLA's FreqFold (NoPE, every frequency rotated): the peer row
        weight = component_weight(settings.rope_key, q, cov, heads, kv_heads, head_dim)
        q_rot, k_rot, p_nope, c_nope, rope_energy = folded_maps(q, k, cov, heads, kv_heads, head_dim, weight,
                                                                settings.freqfold)
    else:
        comps, p, c, rotated = rotary_maps(q, k, cov, heads, kv_heads, head_dim, settings, attention)
        alpha = unrotated_factor(settings.unrotated, attention, q, k, p, c, ~rotated, heads, kv_heads, head_dim,
                                 inv_freq)
        comp, freq = (~rotated).nonzero(as_tuple=True)
        p_nope = p[:, :, comp, freq] * alpha[:, freq][None]  # (D, H, N)
        c_nope = c[:, comp, freq]  # (D, N)
        q_rot, k_rot = p[:, :, 0, freqs], c[:, 0, freqs]
        energy = comps.energy.T  # (G comps, F)
        rope_energy = float(energy[rotated].sum() / energy.sum().clamp_min(1e-300))
    q_rope = interleave(q_rot).permute(1, 0, 2)  # (H, D, rope_dims)
    q_nope = torch.cat([p_nope.real, p_nope.imag], dim=-1).permute(1, 0, 2)  # (H, D, 2N): Re(p conj c) as a dot
    k_rope = interleave(k_rot)  # (D, rope_dims)
    k_nope = torch.cat([c_nope.real, c_nope.imag], dim=-1)  # (D, 2N)
    if settings.latent_weights == "bkv":  # TransMLA: plain PCA of [k, v] with the key rows scaled to the values' norm
        key_root = torch.eye(k_nope.shape[1], dtype=q.dtype)
        values = torch.eye(v.shape[1], dtype=q.dtype)
        balance = float(((cov @ v) * v).sum() / ((cov @ k_nope) * k_nope).sum().clamp_min(1e-300))
    else:
        key_gram = torch.einsum("hni,nm,hmj->ij", q_nope, cov, q_nope)
        key_root = sym_sqrt(key_gram)[0] if key_gram.numel() else key_gram
        values = value_root(o, kv_heads, group, head_dim, list(range(kv_heads)))
        balance = 1.0
    mixed = attention.mixed if settings.o_refit and attention is not None else None
    moment = mixed_value_moment(attention.mixed, cov, v, values) if settings.value_moment == "mixed" else None
    return LayerParts(q_nope, q_rope, k_rope, torch.cat([k_nope, v], dim=1), chol, key_root, values, o,
                      rope_energy, freqs, balance, mixed, moment)


def mixed_value_moment(mixed: torch.Tensor, cov: torch.Tensor, v: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """The attention-mixed input moment averaged over heads (what a value error reaches the output through), scaled
    so that the values' total weighted energy is what it is under the input moment: it moves value errors between
    directions, not between keys and values (the split does that)."""
    moment = mixed.mean(0).to(cov.dtype)
    weighted = v @ root
    scale = ((cov @ weighted) * weighted).sum() / ((moment @ weighted) * weighted).sum().clamp_min(1e-300)
    return moment * scale


def rotated_frequencies(head_dim: int, rope_dims: int | None, how: str = "fastest") -> torch.Tensor:
    """Indices of the original frequencies the shared key keeps rotated, fastest first: with ``rope_dims`` below
    the head width, the ``rope_dims / 2`` fastest (``fastest``) or every (d / rope_dims)-th (``spread``). Either
    set steps evenly from frequency 0, so the engine's rotary embedding over ``rope_dims`` dims reproduces it with
    one theta (``engine_theta``)."""
    count = (rope_dims or head_dim) // 2
    step = 1 if how == "fastest" else head_dim // (2 * count)
    return torch.arange(count) * step


def engine_theta(theta: float, freqs: torch.Tensor, head_dim: int) -> float:
    """The rope theta under which a format's ``2 len(freqs)`` rotary dims turn by exactly the original frequencies
    ``freqs`` (``theta^(-2 f / d)``): the engine's i-th is ``theta'^(-i / n)``, so ``theta' = theta^(2 n step / d)``
    (the original theta when the frequencies are every (d / rope_dims)-th)."""
    count = len(freqs)
    step = int(freqs[1] - freqs[0]) if count > 1 else 1
    if not torch.equal(freqs.cpu(), torch.arange(count) * step):
        raise ValueError(f"rotated frequencies {freqs.tolist()} do not step evenly from 0: no one theta turns them")
    return float(theta) ** (2 * count * step / head_dim)


def rotary_maps(q: torch.Tensor, k: torch.Tensor, cov: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                settings: RotarySettings, attention: LayerAttention | None = None):
    """The rotary components of each frequency and who reads them: ``(comps, p, c, rotated)`` with ``p`` (D, H, G
    comps, F) complex query maps, ``c`` (D, G comps, F) component maps, ``rotated`` (G comps, F) the entries the
    format rotates (component 0 of every kept frequency)."""
    qz = complex_channels(q, heads, head_dim)  # (D, H, F)
    kz = complex_channels(k, kv_heads, head_dim)  # (D, G, F)
    weight = component_weight(settings.rope_key, q, cov, heads, kv_heads, head_dim)
    moment = attention.key_moment if settings.rope_key == "attention" else None
    comps = rotary_components(kz, cov, weight, moment)
    c = torch.einsum("fjg,ngf->njf", comps.encode, kz)  # (D, G comps, F)
    owner = torch.arange(heads) // (heads // kv_heads)
    p = qz[:, :, None, :] * comps.decode.conj()[:, owner, :].permute(1, 2, 0)[None]  # (D, H, G comps, F)
    rotated = torch.zeros(kv_heads, head_dim // 2, dtype=torch.bool)
    rotated[0, rotated_frequencies(head_dim, settings.rope_dims, settings.rope_frequencies)] = True
    return comps, p, c, rotated


def component_weight(rope_key: str, q: torch.Tensor, cov: torch.Tensor, heads: int, kv_heads: int,
                     head_dim: int) -> torch.Tensor:
    """(G, F) weights of the rotary PCA: ones for ``pca`` (TransMLA's RoRoPE: the keys' own principal components),
    else the query energy each KV head's frequency serves."""
    if rope_key == "pca":
        return torch.ones(kv_heads, head_dim // 2, dtype=q.dtype)
    return key_weight(q, cov, heads, kv_heads, head_dim)


def unrotated_factor(kind: str, attention, q, k, p, c, unrotated, heads, kv_heads, head_dim, inv_freq):
    """(H, F) complex factor folded into the unrotated queries (``rotation.py``)."""
    if kind == "nope":
        return torch.ones(heads, head_dim // 2, dtype=p.dtype)
    if kind == "expected":
        return attention.phase.to(p.dtype)
    fit = rotation.score_fit(attention, q, k, p, c, unrotated, heads, kv_heads, head_dim, inv_freq)
    return rotation.refit(fit).to(p.dtype)


def latent_layer(parts: LayerParts, rank: int, split: float) -> LayerMla:
    """The joint latent of ``rank`` dims with key rows weighted ``split`` times more than value rows."""
    n_nope = parts.q_nope.shape[-1]
    root = torch.block_diag(parts.key_root * (split * parts.balance)**0.5, parts.value_root) if n_nope else \
        parts.value_root
    root_inv = torch.linalg.pinv(root, hermitian=True)
    lowrank = weighted_lowrank(parts.target, parts.chol, root, root_inv)
    down, up = lowrank.truncate(rank)
    energy = lowrank.s.square()
    kept = float(energy[:rank].sum() / energy.sum().clamp_min(1e-300))
    if parts.value_moment is not None and rank < len(lowrank.s):  # values priced by another moment: refine
        key_weight = parts.key_root @ parts.key_root * (split * parts.balance)
        joint = joint_lowrank(parts.target[:, :n_nope], parts.target[:, n_nope:], parts.chol, parts.value_moment,
                              key_weight, parts.value_root @ parts.value_root, down)
        down, up = joint.down, joint.up
        kept = 1 - joint.error / max(joint.total, 1e-300)
    if down.shape[1] < rank:  # more latent dims asked than the layer has: zero dims keep the function exact
        pad = rank - down.shape[1]
        down = torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1)
        up = torch.cat([up, up.new_zeros(pad, up.shape[1])], dim=0)
    value_dim = parts.o.shape[1] // parts.q_nope.shape[0]  # the original head width
    kv_heads = (parts.target.shape[1] - n_nope) // value_dim
    up_v = up[:, n_nope:].reshape(rank, kv_heads, -1).permute(1, 0, 2)
    o = parts.o if parts.mixed is None else refit_o(parts, down, up_v)
    return LayerMla(parts.q_nope, parts.q_rope, parts.k_rope, down, up[:, :n_nope], up_v, o, kept,
                    parts.rope_energy, parts.rope_freqs)


def refit_o(parts: LayerParts, down: torch.Tensor, up_v: torch.Tensor) -> torch.Tensor:
    """Per head, the O block that best maps the head's latent value ``x down up_v`` to what the head wrote before,
    ``x W_V W_O,h``, in least squares over the attention-mixed inputs ``P_h x`` (the values attention really
    averages): the latent is fixed, only its read-out into the residual stream adapts (as ``latent`` does)."""
    heads, kv_heads = parts.q_nope.shape[0], up_v.shape[0]
    value_dim = parts.o.shape[1] // heads
    group = heads // kv_heads
    v = parts.target[:, parts.target.shape[1] - kv_heads * value_dim:]  # (D, G d): the original values
    blocks = []
    for h in range(heads):
        g = h // group
        u = down @ up_v[g]  # (D, d): the head's value map through the latent
        blocks.append(refit_readout(u, parts.mixed[h].to(u.dtype), v[:, g * value_dim:(g + 1) * value_dim],
                                    parts.o[:, h * value_dim:(h + 1) * value_dim]))
    return torch.cat(blocks, dim=1)


def full_rank(kv_heads: int, head_dim: int, rope_dims: int | None = None) -> int:
    """Latent dims that hold a layer exactly (up to the lost rotation): unrotated key components and values."""
    return nope_dims(kv_heads, head_dim, rope_dims) + kv_heads * head_dim


def nope_dims(kv_heads: int, head_dim: int, rope_dims: int | None = None) -> int:
    """Unrotated key dims: every component of every frequency but the shared key's kept ones."""
    return kv_heads * head_dim - (rope_dims or head_dim)
