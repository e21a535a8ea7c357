"""What a latent conversion should do: one KV byte budget and how keys meet RoPE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CloverError

ROPE_MODES = ("latent", "shared", "mix")
ALLOCATIONS = ("global", "uniform")


@dataclass
class LatentConfig:
    """Settings of ``to_latent``.

    ``kv_ratio``: fraction of the KV cache removed, in [0, 1) (0: the exact full-rank conversion). The budget is
    shared by keys and values and by all layers; how it is split is chosen from calibration data:
    ``allocation`` ``global`` ranks every candidate direction of every layer together, ``uniform`` gives each
    layer the same number of cached dims. ``split`` weighs key error against value error (both measured in their
    own whitened units, as shares of their layer's total): ``"auto"`` tries ``split_grid`` and keeps the value with the
    lowest loss on held-out calibration windows; a number fixes it.

    ``rope``: how keys meet rotary embeddings. ``latent``: a pre-RoPE key latent, rebuilt at attention time.
    ``shared``: rotary components shared across KV heads per frequency, cached after rotation (exact, nothing
    rebuilt). ``mix``: ``shared_fraction`` of each layer's key dims as shared components, the rest of the key in
    a pre-RoPE latent.

    ``k_dims`` / ``v_dims``: fixed key / value dims for every layer instead of a budget (both or neither).
    ``v_moment``: what whitens the value latent, ``mixed`` (the attention-mixed inputs, averaged over heads) or
    ``input`` (the attention input); ``o_refit`` (with ``mixed``) refits each head's O block to its mixed inputs.
    ``calibration``: token ids (n, seqlen); the last ``holdout`` windows choose the split, the rest give the
    statistics (all of them when the split is fixed).
    """

    kv_ratio: float = 0.0
    rope: str = "latent"
    allocation: str = "global"
    split: str | float = "auto"
    split_grid: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    shared_fraction: float = 0.25
    k_dims: int | None = None
    v_dims: int | None = None
    v_moment: str = "mixed"
    o_refit: bool = True
    calibration: torch.Tensor | None = None
    holdout: int = 4
    compute_dtype: torch.dtype = torch.float64
    progress: bool = True

    @property
    def fixed_dims(self) -> bool:
        return self.k_dims is not None

    def check(self) -> None:
        """What can be said of the settings alone, before any model loads."""
        if self.rope not in ROPE_MODES:
            raise CloverError(f"unknown --rope {self.rope!r}: use one of {', '.join(ROPE_MODES)}")
        if self.v_moment not in ("mixed", "input"):
            raise CloverError(f"unknown --v-moment {self.v_moment!r}: use mixed or input")
        if self.allocation not in ALLOCATIONS:
            raise CloverError(f"unknown --allocation {self.allocation!r}: use one of {', '.join(ALLOCATIONS)}")
        if (self.k_dims is None) != (self.v_dims is None):
            raise CloverError("--k-dims and --v-dims go together: pass both (dims kept per layer), or neither and "
                              "a --kv-ratio")
        if self.fixed_dims:
            if self.kv_ratio:
                raise CloverError("--kv-ratio and --k-dims/--v-dims both given: fixed dims set the budget "
                                  "themselves, so pass one of them")
            if self.v_dims < 1 or self.k_dims < 1:
                raise CloverError(f"--k-dims {self.k_dims} / --v-dims {self.v_dims} leave a layer no key or value "
                                  "dims: use at least 1 of each")
        elif not 0 <= self.kv_ratio < 1:  # also catches NaN
            raise CloverError(f"--kv-ratio {self.kv_ratio} is outside [0, 1): it is the fraction of the KV cache "
                              "removed (0 converts exactly, 0.5 halves the cache)")
        if not 0 < self.shared_fraction < 1 and self.rope == "mix":
            raise CloverError(f"--shared-fraction {self.shared_fraction} is outside (0, 1): it is the share of each "
                              "layer's key dims held as shared rotary components in --rope mix")
        if isinstance(self.split, str):
            if self.split != "auto":
                raise CloverError(f"--split {self.split!r}: use auto or a positive number (the weight of key "
                                  "error against value error)")
            if not self.split_grid or any(not s > 0 for s in self.split_grid):
                raise CloverError("the split grid needs positive weights")
        elif not self.split > 0:
            raise CloverError(f"--split {self.split} must be positive (or auto)")

    def searches_split(self) -> bool:
        """Whether the split is chosen on held-out calibration windows (a budget with more than one way to spend
        it: fixed dims and the exact conversion have one)."""
        return self.split == "auto" and not self.fixed_dims and self.kv_ratio > 0

    def check_against(self, model_config) -> None:
        """The budget against the cache's shape from ``config.json`` alone, so that a ratio (or fixed dims) that
        leaves a layer nothing is refused before any weights load or calibration runs (``budget.allocate`` applies
        the same rule later)."""
        from .budget import check_floor

        shape = cache_shape(model_config)
        if shape is None:
            return
        layers, kv_dims = shape
        if self.fixed_dims:
            if self.k_dims > kv_dims or self.v_dims > kv_dims:
                raise CloverError(f"--k-dims {self.k_dims} / --v-dims {self.v_dims}: every layer has at most "
                                  f"{kv_dims} key and {kv_dims} value dims")
            return
        key_unit = 2 if self.rope == "shared" else 1  # a shared rotary component caches a (cos, sin) pair
        check_floor(self.kv_ratio, self.allocation, [2 * kv_dims] * layers, [key_unit + 1] * layers)


def cache_shape(model_config) -> tuple[int, int] | None:
    """(layers, key dims per layer = KV heads x head width) of a LLaMA-family or GPT-2 config; None otherwise."""
    if getattr(model_config, "model_type", "") not in ("llama", "mistral", "qwen2", "gpt2"):
        return None  # clover's runtimes (pruned, sliced) keep per-layer widths: checked once loaded
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", None)
    heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", None)
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    width = (getattr(model_config, "head_dim", None) or getattr(model_config, "attn_head_dim", None)
             or (hidden // heads if heads and hidden else None))
    if not (layers and kv_heads and width):
        return None
    return layers, kv_heads * width
