"""Hidden-dimension slicing (SliceGPT's method, our implementation): ``slice_(model, SliceConfig) -> (model, report)``.

Every norm's scale (and LayerNorm's shift) folds into the weights that read it; the residual stream is then rotated
by the principal directions of its calibration activations, an exact change of basis, and the weakest directions
are deleted from every matrix that reads or writes the stream. One rotation serves the whole model: SliceGPT uses
one per block and keeps the skip connections exact with a D' x D' matrix on each, which for a small model costs
about as many parameters as slicing saves (SmolLM2-135M: 2 x 30 matrices of 504 x 504 = 15M, against 17M removed
at 12.5%). Slicing composes with everything else: slice -> prune / latent -> fine-tune -> merge.
"""

from .apply import SliceReport, slice_
from .config import SliceConfig

__all__ = ["SliceConfig", "SliceReport", "slice_"]
