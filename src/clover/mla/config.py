"""What an MLA conversion should do, and what the target format allows, checked before any weights load."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CloverError

FAMILIES = ("llama", "mistral", "qwen2")
VLLM_SIZES = (320, 576)  # kv_lora_rank + qk_rope_head_dim that vLLM's MLA attention backends accept
PRESETS = ("vllm",)
LAYOUTS = ("mla", "gqa")
ROPE_KEYS = ("pca", "query", "attention")
UNROTATED = ("nope", "expected", "refit")
ROPE_FREQUENCIES = ("fastest", "spread")
LATENT_WEIGHTS = ("clover", "bkv")
VALUE_MOMENTS = ("input", "mixed")
# what a refit block reads: the original model's inputs, the converted's, or the converted's with the residual
# stream's difference from the original's added to the block's target (``local.py``)
LOCAL_INPUTS = ("original", "converted", "residual")
STREAM_PROJECTIONS = ("o", "down")  # what the stream refit may re-solve, in the order a layer writes them
SPLIT_SEARCHES = ("auto", "layer")  # one key/value split for every layer, or one per layer (both held out)


@dataclass
class MlaConfig:
    """Settings of ``to_mla``.

    ``kv_ratio``: fraction of the KV cache removed, in [0, 1), as in ``latent``: the converted layer caches
    ``kv_lora_rank + d`` numbers per token (the joint latent and the shared rotated key) against ``2 G d``; 0 keeps
    every latent dim (the only error left is the rotation of the key components the format cannot rotate).
    One ``kv_lora_rank`` serves every layer (the engines need it). ``split``: weight of key errors against value
    errors in the joint latent; ``"auto"`` tries ``split_grid`` and keeps the one whose outputs stay closest to the
    original's on the last ``holdout`` calibration windows; ``"layer"`` starts there and then lets each layer keep
    its own split from the grid, one layer at a time (first to last, the others as chosen so far), by the same
    held-out measure: the format fixes one rank for every layer, not one split. ``preset="vllm"``: refuse ranks
    vLLM's MLA kernels cannot run (``kv_lora_rank + d`` in ``VLLM_SIZES``). ``calibration``: token ids (n, seqlen),
    validation text.

    Rotary levers (``solve.py``, ``rotation.py``): ``rope_key`` chooses each frequency's shared rotated component
    (``pca``: the keys' own principal components, TransMLA's RoRoPE; ``query``: weighted by the query energy that
    reads each KV head; ``attention``: also by the attention each key position receives); ``unrotated`` says what
    the other components keep (``nope``: no rotation; ``expected``: the rotation's mean under the original
    attention, folded into the queries; ``refit``: a least-squares fit to the original scores); ``rope_dims``
    below the head width keeps ``rope_dims / 2`` frequencies rotated (partial RoPE, for caches smaller than one full
    rotated key): ``rope_frequencies="fastest"`` the fastest ones (the engine's rotary embedding computes them
    exactly with theta raised to ``rope_dims / head_dim``; the slowest barely turn within a context, so their
    unrotated refit loses little), ``"spread"`` every (head_dim / rope_dims)-th one (the same theta);
    ``latent_weights="bkv"``: TransMLA's joint latent (plain PCA of keys and values
    with their energies balanced) instead of clover's query- and O-weighted one; ``freqfold``: TransMLA's FreqFold
    (``freqfold`` neighbouring frequencies share one PCA, ``freqfold.py``); ``o_refit``: each head's O block
    refit to the latent's values on the attention-mixed inputs (as ``latent`` does); ``value_moment="mixed"``:
    value errors in the joint latent priced by the attention-mixed inputs (what O reads, as ``latent --v-moment
    mixed`` does) instead of the attention input, keys still by the input (``lowrank.joint_lowrank``).

    ``local_steps``: after the solve, each converted attention block is refit on its own to the original block's
    output on the calibration windows (``local.py``: ``local_steps`` Adam steps of ``local_batch`` windows, every
    tensor stepping by ``local_lr`` times its RMS), kept per block where the held-out windows say it helps; 0: off.
    ``local_inputs``: what each refit block reads, the original model's attention inputs (``"original"``: the blocks
    are independent) or the converted model's (``"converted"``: first to last, each after the blocks before it;
    ``"residual"``: the same, and each block's target also carries the difference of the original residual stream
    from the converted one at its input, so the block makes up the error the blocks before it left).

    ``stream_refit``: last, the named projections of ``STREAM_PROJECTIONS`` that write into the residual stream
    (``o``: attention's output projection, ``down``: the MLP's) are re-solved in closed form (``stream.py``: least
    squares on the converted model's own stream, first to last) so the stream after each comes back toward the
    original model's, kept per projection where the held-out windows say it helps.

    ``layout="gqa"``: instead of MLA, the plain ``llama`` architecture with ``kv_heads`` KV heads (``gqa.py``); the
    cache is then ``kv_heads / G`` of the original and ``kv_ratio`` is not used.
    """

    kv_ratio: float = 0.0
    layout: str = "mla"
    kv_heads: int = 1
    split: str | float = "auto"
    split_grid: tuple[float, ...] = (0.25, 1.0, 4.0, 16.0)
    preset: str | None = None
    calibration: torch.Tensor | None = None
    holdout: int = 4
    rope_key: str = "query"
    unrotated: str = "refit"
    rope_dims: int | None = None
    rope_frequencies: str = "fastest"
    latent_weights: str = "clover"
    freqfold: int = 1
    o_refit: bool = True
    value_moment: str = "input"
    refit_windows: int = 2
    local_steps: int = 0
    local_lr: float = 3e-4
    local_batch: int = 4
    local_inputs: str = "original"
    stream_refit: tuple[str, ...] = ()
    compute_dtype: torch.dtype = torch.float64
    progress: bool = True

    def check(self) -> None:
        """What can be said of the settings alone."""
        if not 0 <= self.kv_ratio < 1:  # also catches NaN
            raise CloverError(f"--kv-ratio {self.kv_ratio} is outside [0, 1): it is the fraction of the KV cache "
                              "removed (0 keeps every latent dim, 0.5 halves the cache)")
        if self.layout not in LAYOUTS:
            raise CloverError(f"unknown --layout {self.layout!r}: use {' or '.join(LAYOUTS)}")
        if self.layout == "gqa" and (self.kv_ratio or self.preset or self.rope_dims):
            raise CloverError("--layout gqa sets the cache by --kv-heads: drop --kv-ratio / --preset / --rope-dims "
                              "(they size the MLA latent and its rotated key)")
        if self.kv_heads < 1:
            raise CloverError(f"--kv-heads {self.kv_heads} must be at least 1")
        if self.preset is not None and self.preset not in PRESETS:
            raise CloverError(f"unknown --preset {self.preset!r}: use {', '.join(PRESETS)} (or none)")
        for name, value, allowed in (("--rope-key", self.rope_key, ROPE_KEYS), ("--unrotated", self.unrotated,
                                                                                    UNROTATED),
                                     ("--latent-weights", self.latent_weights, LATENT_WEIGHTS),
                                     ("--value-moment", self.value_moment, VALUE_MOMENTS),
                                     ("--rope-frequencies", self.rope_frequencies, ROPE_FREQUENCIES),
                                     ("--local-inputs", self.local_inputs, LOCAL_INPUTS)):
            if value not in allowed:
                raise CloverError(f"unknown {name} {value!r}: use {', '.join(allowed)}")
        if self.rope_dims is not None and (self.rope_dims < 2 or self.rope_dims % 2):
            raise CloverError(f"--rope-dims {self.rope_dims} must be a positive even number (rotary dims come in "
                              "pairs)")
        if self.freqfold < 1:
            raise CloverError(f"--freqfold {self.freqfold} must be at least 1 (1: no folding)")
        if self.freqfold > 1 and (self.rope_key == "attention" or self.unrotated != "nope" or self.rope_dims):
            raise CloverError("--freqfold is TransMLA's recipe: it runs with --unrotated nope, every rotary dim and "
                              "--rope-key pca or query")
        if self.value_moment == "mixed" and self.latent_weights != "clover":
            raise CloverError("--value-moment mixed prices values by what O reads: it runs with --latent-weights "
                              "clover (TransMLA's bkv latent weighs keys and values by their plain energy)")
        if self.local_steps < 0 or self.local_batch < 1 or not self.local_lr > 0:
            raise CloverError(f"--local-steps {self.local_steps} / --local-batch {self.local_batch} / --local-lr "
                              f"{self.local_lr}: use steps >= 0 (0: no layer-wise refit), a batch of at least one "
                              "window and a positive lr")
        if self.local_steps and self.layout == "gqa":
            raise CloverError("--local-steps refits MLA blocks: drop it with --layout gqa")
        unknown = [p for p in self.stream_refit if p not in STREAM_PROJECTIONS]
        if unknown or len(set(self.stream_refit)) < len(self.stream_refit):
            raise CloverError(f"--stream-refit {','.join(self.stream_refit)}: name each of "
                              f"{', '.join(STREAM_PROJECTIONS)} at most once, comma-separated")
        if self.stream_refit and self.layout == "gqa":
            raise CloverError("--stream-refit refits the layers around MLA blocks: drop it with --layout gqa")
        if self.local_inputs != "original" and not self.local_steps:
            raise CloverError(f"--local-inputs {self.local_inputs} says what the layer-wise refit reads, and none "
                              "runs: add --local-steps N")
        if self.split not in SPLIT_SEARCHES:
            if isinstance(self.split, str) or not self.split > 0:
                raise CloverError(f"--split {self.split!r}: use auto, layer or a positive number (the weight of key "
                                  "errors against value errors in the joint latent)")

    def searches_split(self) -> bool:
        return self.split in SPLIT_SEARCHES and len(self.split_grid) > 1

    def holds_out(self) -> bool:
        """Whether the last ``holdout`` calibration windows are kept apart (the split search, the refits' checks)."""
        return self.searches_split() or self.local_steps > 0 or bool(self.stream_refit)

    def splits_per_layer(self) -> bool:
        return self.split == "layer" and self.searches_split()

    def kv_lora_rank(self, kv_heads: int, head_dim: int) -> int:
        """The latent width that leaves ``1 - kv_ratio`` of the original cache (shared rope key included)."""
        return round((1 - self.kv_ratio) * 2 * kv_heads * head_dim) - (self.rope_dims or head_dim)

    def needs_attention(self) -> bool:
        """Whether a lever reads the original model's attention (one more calibration pass)."""
        return self.rope_key == "attention" or self.unrotated != "nope" or self.mixes_values()

    def mixes_values(self) -> bool:
        """Whether a lever reads the attention-mixed input moments (the O refit, mixed value pricing)."""
        return self.o_refit or self.value_moment == "mixed"

    def check_against(self, model_config) -> int:
        """The target format's rules from ``config.json`` alone: the family, attention without biases or a sliding
        window, plain RoPE, a rank that leaves something and that the preset's engine accepts. Returns the rank."""
        kind = getattr(model_config, "model_type", None)
        if kind not in FAMILIES:
            raise CloverError(f"MLA conversion supports the LLaMA family ({', '.join(FAMILIES)}), not {kind!r}")
        if getattr(model_config, "sliding_window", None) and getattr(model_config, "use_sliding_window", True):
            raise CloverError(f"this {kind} model uses sliding-window attention, which the MLA format (DeepSeek) "
                              "does not have: use a checkpoint without a sliding window")
        if getattr(model_config, "attention_bias", False) or kind == "qwen2":
            raise CloverError(f"this {kind} model has q/k/v biases, which the MLA format has no place for (a query "
                              "bias meets every rotated key): use a model without attention biases")
        rope = dict(getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None)
                    or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CloverError(f"this model's RoPE scaling ({rope_type!r}) has no exact counterpart in the MLA "
                              "format's rotary embedding: refused rather than approximated; use plain RoPE")
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        if self.layout == "gqa":
            if kv_heads % self.kv_heads or self.kv_heads > kv_heads:
                raise CloverError(f"--kv-heads {self.kv_heads} must divide the model's {kv_heads} KV heads (each new "
                                  f"head serves a whole number of them): use one of "
                                  f"{', '.join(str(n) for n in range(1, kv_heads + 1) if kv_heads % n == 0)}")
            return 0
        rope = self.rope_dims or head_dim
        if rope > head_dim:
            raise CloverError(f"--rope-dims {rope} is wider than the head ({head_dim}): use at most {head_dim}")
        if self.rope_frequencies == "spread" and head_dim % rope:
            raise CloverError(f"--rope-dims {rope} must divide the head width {head_dim} with --rope-frequencies "
                              "spread (the engine's rotary frequencies with the same theta are every (head_dim / "
                              "rope_dims)-th original one): use a divisor or --rope-frequencies fastest")
        if (head_dim // 2) % self.freqfold:
            raise CloverError(f"--freqfold {self.freqfold} must divide the head's {head_dim // 2} rotary frequencies")
        rank = self.kv_lora_rank(kv_heads, head_dim)
        if rank < 1:
            raise CloverError(f"--kv-ratio {self.kv_ratio} leaves {rank + rope} cached numbers per token, no "
                              f"more than the shared rotated key ({rope}): use a smaller ratio or fewer --rope-dims")
        if self.preset == "vllm" and rank + rope not in VLLM_SIZES:
            fits = [(1 - (s) / (2 * kv_heads * head_dim), s - rope) for s in VLLM_SIZES if s > rope]
            hint = " or ".join(f"--kv-ratio {r:g} (kv_lora_rank {k})" for r, k in fits if 0 <= r < 1) or \
                "none fits this model"
            raise CloverError(f"--preset vllm: vLLM's MLA kernels accept kv_lora_rank + qk_rope_head_dim of "
                              f"{' or '.join(map(str, VLLM_SIZES))}, and --kv-ratio {self.kv_ratio} gives "
                              f"{rank} + {rope} = {rank + rope}: pass {hint}")
        return rank
