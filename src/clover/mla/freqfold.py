"""TransMLA's FreqFold, re-implemented from its description as a peer to measure against: neighbouring rotary
frequencies share one principal-component analysis.

Without folding, each frequency's G key channels give G components, and the strongest one is rotated (exact under
RoPE). With a fold of ``phi`` neighbouring frequencies, the ``G phi`` channels of the group are analysed together
and the ``phi`` strongest components take the group's ``phi`` rotated slots, each turned by the frequency of the
slot it is given (the one whose channels it draws on most). A component mixing channels of two frequencies is then
turned at one of them: FreqFold trades that rotation error for more energy in the rotated key, betting that
neighbouring frequencies turn almost alike. The remaining components attend without rotation (NoPE), as in
TransMLA. Pure math, float64.
"""

from __future__ import annotations

import torch

from ..lowrank import complex_channels, rotary_components


def folded_maps(q: torch.Tensor, k: torch.Tensor, cov: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                weight: torch.Tensor, fold: int):
    """``(q_rot (D, H, F), k_rot (D, F), p_nope (D, H, N), c_nope (D, N), rope_energy)``, all complex maps but the
    energy: the rotated query/key channel of every frequency slot and the unrotated pairs. ``weight``: (G, F) the
    per-channel PCA weights (ones for TransMLA's RoRoPE)."""
    frequencies = head_dim // 2
    groups = frequencies // fold
    qz = complex_channels(q, heads, head_dim)  # (D, H, F)
    kz = complex_channels(k, kv_heads, head_dim)  # (D, G, F)
    # channels of one group ordered (g, f within the group): (D, G fold, groups)
    kf = kz.reshape(-1, kv_heads, groups, fold).permute(0, 1, 3, 2).reshape(-1, kv_heads * fold, groups)
    wf = weight.reshape(kv_heads, groups, fold).permute(0, 2, 1).reshape(kv_heads * fold, groups)
    comps = rotary_components(kf, cov, wf)
    c = torch.einsum("bjn,dnb->djb", comps.encode, kf)  # (D, G fold comps, groups)
    owner = torch.arange(heads) // (heads // kv_heads)
    decode = comps.decode.reshape(groups, kv_heads, fold, -1)  # (groups, G, f in group, comps)
    qg = qz.reshape(-1, heads, groups, fold)  # (D, H, groups, f in group)
    # head h reads component j of group b through every frequency of the group it owns channels at
    p = torch.einsum("dhbf,bhfj->dhjb", qg, decode[:, owner].conj())  # (D, H, comps, groups)
    q_rot = qz.new_zeros(qz.shape)
    k_rot = kz.new_zeros(kz.shape[0], frequencies)
    share = (comps.encode.abs().square().reshape(groups, -1, kv_heads, fold).sum(2))  # (groups, comps, f in group)
    for b in range(groups):
        free = list(range(fold))
        for j in range(fold):  # strongest component first takes the slot it draws on most
            slot = max(free, key=lambda f: float(share[b, j, f]))
            free.remove(slot)
            q_rot[:, :, b * fold + slot] = p[:, :, j, b]
            k_rot[:, b * fold + slot] = c[:, j, b]
    p_nope = p[:, :, fold:].reshape(p.shape[0], heads, -1)
    c_nope = c[:, fold:].reshape(c.shape[0], -1)
    energy = comps.energy  # (groups, comps)
    return q_rot, k_rot, p_nope, c_nope, float(energy[:, :fold].sum() / energy.sum().clamp_min(1e-300))
