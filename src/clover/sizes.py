"""What a rewrite changes in size: parameters and KV-cache bytes per token, and the report fields that carry them.

``PruneReport``, ``LatentReport`` and ``SliceReport`` all extend ``SizeReport``, so the CLI prints one summary for
any of them and a warning whenever the output is larger than its input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .adapters import adapter_for


@dataclass(kw_only=True)
class SizeReport:
    """Size before and after a rewrite; the room's own report adds what it decided."""

    params_before: int
    params_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    calibration_tokens: int = 0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def warn_if_larger(self) -> None:
        """A rewrite meant to compress can still grow the model (a latent's up-projections at a small ratio): say so."""
        if self.params_after > self.params_before:
            growth = self.params_after / self.params_before - 1
            self.warnings.append(f"the output has {growth:.1%} more parameters than the input "
                                 f"({self.params_before:,} -> {self.params_after:,})")


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes one token adds to the KV cache: K and V rows of every self-attention block that caches them.

    Encoders' self-attention caches nothing; cross-attention caches once per encoder position, not per token.
    """
    adapter = adapter_for(model)
    total = 0
    for site in adapter.sites(model):
        if adapter.caches_per_token(site):
            w = adapter.read(site)
            total += adapter.cache_width(site, w) * w.k.weight.element_size()
    return total


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
