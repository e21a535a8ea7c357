"""Whisper (encoder-decoder speech recognition): three kinds of attention block, all with separate projections.

- encoder ``layers.i.self_attn``: over audio frames (sinusoidal positions added before the layers);
- decoder ``layers.i.self_attn``: causal, over text tokens (learned absolute positions), K/V cached per token;
- decoder ``layers.i.encoder_attn``: cross-attention, Q from the decoder, K and V from the encoder output.

No rotary embeddings anywhere, so Q-K and V-O are exact pairs in all three. ``k_proj`` has no bias (q, v and
``out_proj`` do). Whisper multiplies q by ``head_dim**-0.5`` right after ``q_proj``: a constant, so it does not
touch the pair's factors, and the pruned runtime keeps the original value.

Calibration has no audio offline: the encoder sees log-mel features of synthetic, speech-like audio (harmonic
tones with gliding pitch and syllable-rate envelopes plus noise, fixed seed) computed by transformers'
``WhisperFeatureExtractor``; the decoder sees the calibration text. Real speech statistics differ, so the
whitened criterion is weaker on the encoder side than with real audio; pass real features through
``set_calibration_features`` (the CLI's ``--calib-features``) when you have them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CloverError
from .base import AttentionSite, LinearsAdapter

STACKS = {"encoder.self_attn": "encoder", "decoder.self_attn": "decoder", "decoder.encoder_attn": "cross"}
SUPPORTED = "WhisperForConditionalGeneration or WhisperModel (encoder + decoder with self- and cross-attention)"
_FEATURES_ATTR = "clover_calibration_features"
_ASSIGNMENT_ATTR = "clover_calibration_clips"


def _window_key(row: torch.Tensor) -> int:
    """A calibration window's identity from its token ids alone (not its position in a batch)."""
    row = row.long().cpu()
    return int((row * torch.arange(1, row.numel() + 1)).sum()) % (2**31)


def set_calibration_features(model: nn.Module, features: torch.Tensor | None,
                             windows: torch.Tensor | None = None) -> list[int] | None:
    """Use these log-mel features (n, num_mel_bins, frames) for calibration instead of synthetic audio.

    With ``windows`` (the calibration token ids, (w, seqlen)), the clips are dealt out evenly: windows sorted by
    their key take clips 0, 1, ..., n-1, 0, 1, ... so each clip is read by ``w // n`` or ``w // n + 1`` windows
    (every clip when ``w >= n``); returns those counts. Without, a window reads the clip its key picks (uneven).
    Either way a window's clip depends on its tokens only, not on batch order.
    """
    if features is not None:
        expected = (model.config.num_mel_bins, 2 * model.config.max_source_positions)
        if features.dim() != 3 or tuple(features.shape[1:]) != expected:
            raise CloverError(f"calibration features have shape {tuple(features.shape)}, this Whisper needs "
                              f"(n, {expected[0]}, {expected[1]}): compute them with WhisperFeatureExtractor")
    setattr(model, _FEATURES_ATTR, features)
    assignment, uses = None, None
    if features is not None and windows is not None:
        keys = [_window_key(row) for row in windows]
        assignment, uses = {}, [0] * features.shape[0]
        for rank, i in enumerate(sorted(range(len(keys)), key=lambda i: (keys[i], i))):
            clip = assignment.setdefault(keys[i], rank % features.shape[0])
            uses[clip] += 1
    setattr(model, _ASSIGNMENT_ATTR, assignment)
    return uses


def require_whisper(model: nn.Module | None, flag: str) -> None:
    """Encoder calibration options (``--calib-features``, ``--calib-audio``) apply to Whisper models only."""
    found = getattr(getattr(model, "config", None), "model_type", None)
    if found not in WhisperAdapter.model_types:
        raise CloverError(f"{flag} is for Whisper models, not {found!r}: drop it")


def load_calibration_features(model: nn.Module, path: str | os.PathLike) -> None:
    """Read log-mel features from a ``.pt`` (a tensor) or ``.npy`` file and calibrate ``model`` with them."""
    require_whisper(model, "--calib-features")
    path = Path(path)
    if path.suffix not in (".npy", ".pt"):
        raise CloverError(f"calibration features {path} must be a .pt or .npy file: save them with torch.save "
                          "or numpy.save")
    try:
        features = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CloverError(f"calibration features {path} could not be read ({error}): save a tensor of shape "
                          "(n, num_mel_bins, frames) with torch.save or numpy.save") from error
    if not isinstance(features, torch.Tensor):
        raise CloverError(f"calibration features {path} hold a {type(features).__name__}, not a tensor: save the "
                          "input_features tensor of WhisperFeatureExtractor")
    set_calibration_features(model, features.float())


def synthetic_log_mel(config, index: int, seed: int = 0) -> torch.Tensor:
    """Log-mel features (num_mel_bins, 2 * max_source_positions) of a synthetic speech-like clip.

    Voiced speech is a harmonic series on a gliding pitch, switched on and off at syllable rate; this stands in
    for it so the encoder's inputs have speech-like spectra rather than the flat spectrum of white noise.
    """
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    samples = 2 * config.max_source_positions * extractor.hop_length
    rate = extractor.sampling_rate
    rng = np.random.default_rng([seed, index])
    t = np.arange(samples) / rate
    pitch = rng.uniform(90, 260) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, np.pi)), 0, None)
    audio = 0.1 * envelope * harmonics + 0.005 * rng.standard_normal(samples)
    features = extractor(audio.astype(np.float32), sampling_rate=rate, return_tensors="pt", padding="max_length",
                         max_length=samples, truncation=True).input_features
    return features[0]


class WhisperAdapter(LinearsAdapter):
    name = "whisper"
    model_types = ("whisper", "clover_whisper")
    prunes_cross_attention = True
    linear_names = ("q_proj", "k_proj", "v_proj", "out_proj")

    def sites(self, model: nn.Module) -> list[AttentionSite]:
        from transformers.models.whisper.modeling_whisper import WhisperAttention

        cfg = model.config
        core = getattr(model, "model", model)  # ForConditionalGeneration wraps a WhisperModel
        encoder, decoder = getattr(core, "encoder", None), getattr(core, "decoder", None)
        if encoder is None or decoder is None:
            raise CloverError(f"{type(model).__name__} has no {'encoder' if encoder is None else 'decoder'}: "
                              f"clover supports {SUPPORTED}")
        prefix = "model." if core is not model else ""
        sites = []
        for stack_name, layers, wanted in (("encoder", encoder.layers, ("self_attn",)),
                                           ("decoder", decoder.layers, ("self_attn", "encoder_attn"))):
            heads = cfg.encoder_attention_heads if stack_name == "encoder" else cfg.decoder_attention_heads
            for i, layer in enumerate(layers):
                for attr in wanted:
                    module = getattr(layer, attr, None)
                    name = f"{prefix}{stack_name}.layers.{i}.{attr}"
                    if not isinstance(module, WhisperAttention):
                        found = "nothing" if module is None else type(module).__name__
                        raise CloverError(f"{name}: expected a WhisperAttention, found {found}; clover supports "
                                          f"{SUPPORTED}")
                    role = "cross" if attr == "encoder_attn" else "self"
                    sites.append(AttentionSite(name, i, module, heads, heads, rotary=False, role=role,
                                               stack=STACKS[f"{stack_name}.{attr}"],
                                               caches_kv=role == "self" and stack_name == "decoder"))
        return sites

    def calibration_inputs(self, model: nn.Module, input_ids: torch.Tensor) -> dict:
        """Audio features for the encoder (user-set or synthetic) and the text as decoder input ids.

        Each sample's clip is picked from its token ids, not by call order (the even deal of
        ``set_calibration_features(..., windows=)``, else a hash), so the statistics do not depend on the order of
        batches or on earlier calibrations of the same model (sweeps reuse it).
        """
        param = next(model.parameters())
        features = getattr(model, _FEATURES_ATTR, None)
        assignment = getattr(model, _ASSIGNMENT_ATTR, None) or {}
        rows = []
        for row in input_ids:
            index = _window_key(row)
            rows.append(features[assignment.get(index, index % features.shape[0])] if features is not None
                        else synthetic_log_mel(model.config, index))
        ids = input_ids[:, : model.config.max_target_positions]
        return {"input_features": torch.stack(rows).to(device=param.device, dtype=param.dtype),
                "decoder_input_ids": ids}

    def example_inputs(self, model: nn.Module, batch: int = 2, seqlen: int = 32, seed: int = 0) -> dict:
        """Random log-mel-shaped features and random decoder tokens for the lossless check."""
        gen = torch.Generator().manual_seed(seed)
        cfg = model.config
        param = next(model.parameters())
        features = torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=gen)
        ids = torch.randint(0, cfg.vocab_size, (batch, min(seqlen, cfg.max_target_positions)), generator=gen)
        return {"input_features": features.to(device=param.device, dtype=param.dtype),
                "decoder_input_ids": ids.to(param.device)}
