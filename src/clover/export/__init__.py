"""Exports to the engines people serve with: one GGUF writer per target architecture for llama.cpp.

``export_gguf(model, source, folder, out, GgufConfig(type="f16"))``: gguf.py (the flow, file types, atomic write),
llama.py and deepseek2.py (one file per llama.cpp architecture: metadata and tensor layout), tokenizer.py (metadata
carried from the source GGUF or built from tokenizer.json), engine.py (running a file in llama.cpp: logits,
perplexity).
"""

from .gguf import ExportReport, GgufConfig, export_gguf

__all__ = ["ExportReport", "GgufConfig", "export_gguf"]
