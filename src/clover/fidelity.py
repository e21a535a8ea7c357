"""How faithful an encoder stays to its original: what a sentence-embedding user checks after pruning.

Perplexity means nothing for a bidirectional encoder. What users keep is the embedding: the mean of the last hidden
states over a text's tokens. Two numbers say whether it survived, both on held-out text (WikiText-2 test rows,
never the calibration split):

- the mean cosine between each text's embedding from the compressed and from the original model (1.0: unchanged);
- the Spearman rank correlation between the two models' pairwise text similarities (1.0: every retrieval ranking
  is preserved), which is what search and clustering depend on even when embeddings drift as a whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import CloverError


@dataclass(frozen=True)
class FidelityResult:
    mean_cosine: float  # mean over texts of cos(embedding, original embedding)
    min_cosine: float
    similarity_spearman: float  # rank correlation of the pairwise cosine similarities of the two models
    texts: int
    max_length: int

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_texts(rows: list[str], count: int, min_chars: int = 40) -> list[str]:
    """The first ``count`` prose rows (no blank lines or ``= Heading =`` rows), stripped."""
    if count < 2:
        raise CloverError(f"--max-texts {count}: at least 2 texts are needed to compare similarities")
    texts = [r.strip() for r in rows if len(r.strip()) >= min_chars and not r.strip().startswith("=")]
    if len(texts) < 2:
        raise CloverError("the held-out text has fewer than 2 prose rows: pass a corpus with more text")
    return texts[:count]


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 16) -> torch.Tensor:
    """(texts, hidden) float64: each text's last hidden states averaged over its real (unpadded) tokens."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1].double()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x).scatter_(0, x.argsort(), torch.arange(x.numel(), dtype=x.dtype))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D samples (continuous values: ties have probability zero)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-300))


def _pairwise_cosines(emb: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(emb, dim=-1)
    sims = unit @ unit.T
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    return sims[i, j]


def embedding_fidelity(model, original, tokenizer, texts: list[str], max_length: int = 128,
                       batch_size: int = 16) -> FidelityResult:
    if tokenizer is None:
        raise CloverError("the model has no tokenizer, so texts cannot be embedded: save one next to the weights")
    if tokenizer.pad_token is None:  # decoder tokenizers (GPT-2) ship none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    got = mean_pooled(model, tokenizer, texts, max_length, batch_size)
    want = mean_pooled(original, tokenizer, texts, max_length, batch_size)
    if got.shape != want.shape:
        raise CloverError(f"the two models embed into different sizes ({got.shape[-1]} vs {want.shape[-1]}): "
                          "--compare takes the model this one was made from")
    cosines = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    return FidelityResult(float(cosines.mean()), float(cosines.min()),
                          spearman(_pairwise_cosines(got), _pairwise_cosines(want)), len(texts), max_length)
