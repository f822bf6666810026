"""lm-eval backend: ``lm_eval --model hf --model_args pretrained=DIR[,quantized=True]``.

With moeq installed, lm-eval's stock ``hf`` model loads a packed checkpoint already (its
``from_pretrained`` goes through moeq's transformers quantization method). This subclass,
registered under lm-eval's ``hf`` names by the startup hook (_startup.py), adds only the
paper's ``quantized`` argument: ``quantized=True`` checks that ``pretrained`` is a packed
checkpoint (one clear error otherwise); ``quantized=False`` or no argument loads whatever the
checkpoint is; any other value is an error. Everything else is lm-eval's ``HFLM``.

From Python (no hook needed)::

    from moeq.huggingface import QuantizedHFLM
    lm = QuantizedHFLM(pretrained="quantized_ckpts/2p0", quantized=True, batch_size=32)
"""
from __future__ import annotations

import warnings

import torch
from lm_eval.models.huggingface import HFLM

from . import hf_quantizer
from .quant.format import read_quantization_config

HF_ALIASES = ("hf", "hf-auto", "huggingface")


class QuantizedHFLM(HFLM):
    def __init__(self, pretrained, quantized: bool | None = None, **kwargs):
        if quantized is not None and not isinstance(quantized, bool):
            raise ValueError(f"quantized={quantized!r} is not a boolean: write quantized=True (a packed moeq "
                             f"checkpoint) or leave it out")
        if quantized and isinstance(pretrained, str):
            read_quantization_config(pretrained)  # a clear error for a directory that is not a packed checkpoint
        hf_quantizer.register()
        self.pretrained_name = pretrained if isinstance(pretrained, str) else type(pretrained).__name__
        super().__init__(pretrained, **kwargs)

    def _create_model(self, *args, quantization_config=None, **kwargs):
        # HFLM hands the checkpoint's own quantization_config back to from_pretrained (None
        # would erase it), and transformers warns that it uses the checkpoint's: it is the same.
        with warnings.catch_warnings():
            if isinstance(quantization_config, hf_quantizer.MoeqConfig):
                warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            return super()._create_model(*args, quantization_config=quantization_config, **kwargs)


    def _model_call(self, inps, attn_mask=None, labels=None):
        logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if not bool(torch.isfinite(logits).all()):  # else lm-eval reports NaN metrics and exits 0
            raise RuntimeError(f"the model's logits are not finite (NaN or inf) for a batch of {tuple(inps.shape)} "
                               f"tokens: the checkpoint {self.pretrained_name!r} or its dtype is broken; results "
                               f"would be meaningless")
        return logits


def register() -> None:
    """Point lm-eval's ``hf`` model names at QuantizedHFLM. lm-eval has no plugin mechanism
    for models and its registry refuses to re-register a name, so the entry is replaced in
    the registry's table (lm-eval's files are not touched)."""
    from lm_eval.api.registry import model_registry
    for alias in HF_ALIASES:
        model_registry._objs[alias] = QuantizedHFLM


register()  # importing this module (the Python API) is enough
