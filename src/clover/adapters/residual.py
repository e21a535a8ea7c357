"""Where a family's residual stream is read and written: what hidden-dimension slicing (``clover.slicing``) needs.

Every tensor that touches the stream is named by its state-dict key and the axis that has the hidden size, so the
slicing room can rotate and cut any of them without knowing the family: readers sit behind a norm (whose scale,
and LayerNorm's shift, fold into them), writers add to the stream, embeddings write the first state. Adapters of
families with a folding rule build a ``ResidualLayout``; the others do not, and slicing refuses them by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Port:
    """One tensor touching the stream: ``key`` its state-dict name, ``axis`` its hidden-size dimension.

    For a reader, ``bias`` is its output bias, which takes the fold of a LayerNorm's shift (a reader without one
    behind a LayerNorm with a shift cannot be folded). For a writer, ``bias`` is the bias it adds to the stream."""

    key: str
    axis: int
    bias: str | None = None


@dataclass(frozen=True)
class NormSite:
    """A norm reading the stream (``module`` its name, for calibration hooks) and the tensors reading its output."""

    module: str
    weight: str
    bias: str | None
    readers: tuple[Port, ...]


@dataclass(frozen=True)
class ResidualLayout:
    """``norm``: ``rms`` (LLaMA, DeepSeek-V2) or ``layer`` (GPT-2: a mean is subtracted, the rotated stream keeps it
    in one coordinate that the runtime's norms skip). ``final`` is the norm before the head; its readers are the
    head when the head can take the fold (untied, no shift), else empty: the head then gets a small projection.
    ``tied``: the head shares the first embedding's table."""

    norm: str
    embeddings: tuple[str, ...]
    norms: tuple[NormSite, ...]
    final: NormSite
    writers: tuple[Port, ...]
    head: str
    tied: bool

    def all_norms(self) -> tuple[NormSite, ...]:
        return (*self.norms, self.final)
