"""Converting checkpoints bigger than memory: read, rewrite and write one decoder layer at a time.

``stream_orthogonalize`` and ``stream_prune`` take a safetensors checkpoint folder (sharded or not) and write the
converted checkpoint shard by shard, resumably, with peak memory about one layer. They run the same functions as
``orthogonalize_`` and ``prune``, so the results agree with the in-memory ones.
"""

from .checkpoint import is_streamable, open_checkpoint
from .convert import StreamOptions, stream_orthogonalize, stream_prune

__all__ = ["StreamOptions", "is_streamable", "open_checkpoint", "stream_orthogonalize", "stream_prune"]
