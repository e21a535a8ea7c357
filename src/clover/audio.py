"""Real speech for calibrating a Whisper encoder: a folder of audio files -> the model's own log-mel features.

Whitening the encoder on synthetic clips calibrates it on sounds it never hears in use. Users have speech; this
reads it with soundfile (wav, flac and whatever libsndfile reads), mixes it to mono, resamples it to the feature
extractor's rate with soxr, and runs the feature extractor saved with the model, so the features are exactly what
the model sees at inference (30-second windows, padded or truncated as the extractor does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CloverError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def audio_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CloverError(f"--calib-audio {folder} is not a folder: pass a folder of {', '.join(AUDIO_SUFFIXES)} "
                          "files")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise CloverError(f"--calib-audio {folder} holds no {', '.join(AUDIO_SUFFIXES)} files: put some speech "
                          "recordings there")
    return files


def read_mono(path: Path, rate: int) -> np.ndarray:
    """The file as float32 mono samples at ``rate`` Hz."""
    import soundfile
    import soxr

    try:
        samples, native = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise CloverError(f"audio file {path} could not be read ({error}): pass wav or flac files") from None
    mono = samples.mean(axis=1)
    if native != rate:
        mono = soxr.resample(mono, native, rate)
    return mono.astype(np.float32)


def feature_extractor(model: str):
    """The feature extractor saved with the model (preprocessor_config.json), as the model was trained with."""
    from transformers import AutoFeatureExtractor

    from .models import resolve

    source = resolve(model)
    try:
        return AutoFeatureExtractor.from_pretrained(source.path)
    except Exception as error:  # transformers raises several kinds for a missing or broken preprocessor config
        raise CloverError(f"model {model} has no usable feature extractor ({str(error).splitlines()[0][:120]}): save "
                          "its WhisperFeatureExtractor next to the weights (preprocessor_config.json)") from None


@dataclass
class CalibrationAudio:
    """A folder's clips as the encoder sees them: features (clips, mel bins, frames), and per clip its file and the
    seconds of it inside the encoder's window (longer clips are truncated, shorter ones padded)."""

    features: torch.Tensor
    files: list[str]
    seconds: list[float]

    def summary(self, uses: list[int]) -> tuple[str, list[dict]]:
        """A one-line note for the report and a row per clip for the JSON (``uses``: windows that read each clip)."""
        rows = [{"file": f, "seconds": round(s, 3), "windows": u} for f, s, u in zip(self.files, self.seconds, uses,
                                                                                      strict=True)]
        note = (f"calibration audio: {len(self.files)} clips, {min(self.seconds):.1f}-{max(self.seconds):.1f} s of "
                f"audio each, every clip read by {min(uses)}" + (f"-{max(uses)}" if max(uses) != min(uses) else "")
                + f" of {sum(uses)} calibration windows")
        return note, rows


def read_calibration_audio(folder: str | os.PathLike, model: str, config) -> CalibrationAudio:
    """Every audio file in ``folder`` as features for the Whisper model ``model``, with its seconds."""
    files = audio_files(folder)
    extractor = feature_extractor(model)
    if getattr(extractor, "feature_size", None) != config.num_mel_bins:
        raise CloverError(f"the feature extractor of {model} makes {extractor.feature_size} mel bins but the model "
                          f"reads {config.num_mel_bins}: save the matching WhisperFeatureExtractor with the model")
    samples = 2 * config.max_source_positions * extractor.hop_length  # the encoder's whole input window
    clips = [read_mono(path, extractor.sampling_rate) for path in files]
    features = extractor(clips, sampling_rate=extractor.sampling_rate, return_tensors="pt", padding="max_length",
                         max_length=samples, truncation=True).input_features
    seconds = [min(len(clip), samples) / extractor.sampling_rate for clip in clips]
    return CalibrationAudio(features.float(), [str(p) for p in files], seconds)


def log_mel_from_folder(folder: str | os.PathLike, model: str, config) -> torch.Tensor:
    """(files, mel bins, frames) features of every audio file in ``folder`` for the Whisper model ``model``."""
    return read_calibration_audio(folder, model, config).features
