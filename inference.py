"""Load a packed checkpoint (format: quant/format.py) as a transformers model.

With moeq installed, plain transformers does it:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("quantized_ckpts/2p0", device_map="auto", dtype=torch.float16)

``load_quantized_model`` is the same call with the paper repo's name, and it first checks
that the directory is a packed checkpoint of a version this moeq reads (one clear error
instead of transformers loading unquantized weights).
"""
from __future__ import annotations

from .quant.format import FormatError, verify_checkpoint

CheckpointError = FormatError   # the name moeq 0.1 used


def load_quantized_model(path: str, device_map=None, dtype="auto", model_class=None, attn_implementation=None,
                         max_memory: dict | None = None, verify: bool | None = None, **kwargs):
    """device_map: None (CPU), a device ("cuda:0"), "auto" (spread over the visible GPUs, then
    CPU and disk), or a device map dict; dtype: the compute dtype of unquantized tensors and
    activations ("auto": the checkpoint's). model_class: an Auto class (causal LM default).
    verify: check the weight files' sha256 (default: yes, unless MOEQ_VERIFY=0); files,
    headers and shapes are always checked."""
    from transformers import AutoModelForCausalLM

    from . import hf_quantizer
    hf_quantizer.register()
    verify_checkpoint(path, verify)
    model_class = model_class or AutoModelForCausalLM
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    model = model_class.from_pretrained(path, device_map=device_map, dtype=dtype, **kwargs)
    return model.eval()
