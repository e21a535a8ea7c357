"""MLA conversion: a LLaMA-family model -> a stock DeepSeek-V3 checkpoint that engines run with a latent-only cache.

``to_mla(model, MlaConfig(kv_ratio=0.5, calibration=ids)) -> (DeepseekV3ForCausalLM, MlaReport)``: config.py
(settings, the format's rules), solve.py (the rotary split and the joint latent: pure math), deepseek.py (the stock
class, the latent norm made linear), reference.py (clover's reference of the converted function), convert.py (the
flow, the held-out split, verification).
"""

from .config import MlaConfig
from .convert import MlaReport, to_mla

__all__ = ["MlaConfig", "MlaReport", "to_mla"]
