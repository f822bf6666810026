"""lm-eval backend: ``lm_eval --model hf --model_args pretrained=DIR,quantized=True``.

``QuantizedHFLM`` is lm-eval's own ``HFLM`` with one more model argument,
``quantized``: when true the model is built by ``inference.load_quantized_model``
(packed weights, dequantized on the fly); otherwise it is stock ``hf``. ``dtype``,
``parallelize`` (accelerate device map over the visible GPUs), ``device``,
``max_memory_per_gpu`` and ``batch_size`` mean what they mean for ``hf``.

It is registered under lm-eval's ``hf`` names by moeq_lm_eval_hook (installed as a
startup hook), or by hand::

    import huggingface; huggingface.register()
"""
from __future__ import annotations

from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype

from inference import load_quantized_model

HF_ALIASES = ("hf", "hf-auto", "huggingface")


def _truthy(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "y")


class QuantizedHFLM(HFLM):
    def __init__(self, pretrained, quantized: bool | str = False, **kwargs):
        self._quantized = _truthy(quantized)
        super().__init__(pretrained, **kwargs)

    def _get_config(self, pretrained, **kwargs):
        super()._get_config(pretrained, **kwargs)
        if self._quantized and isinstance(pretrained, str):
            from inference import read_quantization_config
            read_quantization_config(pretrained)  # a clear error for a directory that is not a packed checkpoint
            # Ours, not a transformers quantizer: HFLM would hand it to AutoQuantizationConfig.
            self._config.quantization_config = None

    def _create_model(self, pretrained, revision="main", dtype="auto", trust_remote_code=False, parallelize=False,
                      gpus=None, max_memory_per_gpu=None, max_cpu_memory=None, offload_folder="./offload",
                      **kwargs):
        if not self._quantized:
            return super()._create_model(pretrained, revision=revision, dtype=dtype,
                                         trust_remote_code=trust_remote_code, parallelize=parallelize, gpus=gpus,
                                         max_memory_per_gpu=max_memory_per_gpu, max_cpu_memory=max_cpu_memory,
                                         offload_folder=offload_folder, **kwargs)
        args = self._get_accelerate_args(parallelize=parallelize, device_map=kwargs.get("device_map"),
                                         max_memory_per_gpu=max_memory_per_gpu, max_cpu_memory=max_cpu_memory,
                                         offload_folder=offload_folder, gpus=gpus)
        self._model = load_quantized_model(pretrained, device_map=args.get("device_map"), dtype=get_dtype(dtype),
                                           model_class=self.AUTO_MODEL_CLASS,
                                           attn_implementation=kwargs.get("attn_implementation"),
                                           max_memory=args.get("max_memory"))


def register() -> None:
    """Point lm-eval's ``hf`` model names at QuantizedHFLM. lm-eval has no plugin
    mechanism for models and its registry refuses to re-register a name, so the entry
    is replaced in the registry's table (lm-eval's files are not touched)."""
    from lm_eval.api.registry import model_registry
    for alias in HF_ALIASES:
        model_registry._objs[alias] = QuantizedHFLM


register()  # importing this module (the Python API) is enough to make ``hf`` quantization-aware
