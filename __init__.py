"""moeq: expert-wise mixed-precision post-training quantization of MoE language models.

    import moeq
    result = moeq.quantize(moeq.RunConfig(model="mistralai/Mixtral-8x7B-v0.1", dataset="wikitext2",
                                          quant=moeq.QuantConfig(avg_bits=2.0), saving_path="out/2p0"))
    # later, anywhere moeq is installed (no import needed):
    model = transformers.AutoModelForCausalLM.from_pretrained("out/2p0", device_map="auto")

The installed package is this directory (``moeq``); quantize_mixtral.py and
quantize_switch.py are thin command-line callers of ``quantize``. Attributes are imported
on first use, so ``import moeq`` (done at every interpreter start by the startup hook)
stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_LAZY = {
    "quantize": "api", "QuantizeResult": "api", "prepare_data": "api",
    "RunConfig": "config", "QuantConfig": "config", "ConfigError": "config",
    "load_quantized_model": "inference", "greedy_generate": "inference",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moeq' has no attribute {name!r}")
