"""moeq as a transformers quantization method: ``from_pretrained`` loads packed checkpoints.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("quantized_ckpts/2p0", device_map="auto")

``register()`` adds the method ``moeq`` to transformers' quantizer registry (its public
extension point, ``register_quantization_config`` / ``register_quantizer``). The installed
package calls it by itself when transformers' registry is first imported (``_startup.py``),
so user code needs no import. The quantizer swaps, on the meta device before any weight is
read, every module named in the checkpoint's quantization_config for its packed
counterpart (quant/modules.py); transformers then reads the packed tensors into them by
name, with its usual device maps, offload and dtype handling.
"""
from __future__ import annotations

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .quant.format import (FORMAT_NAME, FORMAT_VERSION, QUANT_METHOD, FormatError, check_version, verify_files,
                           want_checksums)


class MoeqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed checkpoint (fields: quant/format.py)."""

    def __init__(self, format: str = FORMAT_NAME, version: int = FORMAT_VERSION, group_size: int = 128,
                 sym: bool = False, modules: dict | None = None, checksums: dict | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format, self.version, self.group_size, self.sym = format, version, group_size, sym
        self.modules = modules or {}
        self.checksums = checksums or {}
        for k, v in kwargs.items():  # fields of later versions are kept, not dropped
            setattr(self, k, v)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class MoeqHfQuantizer(HfQuantizer):
    """Loads pre-quantized (packed) checkpoints; quantizing happens in quantize_mixtral.py."""
    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        qc = self.quantization_config
        if qc.format != FORMAT_NAME:
            raise FormatError(f"quantization_config.format is {qc.format!r}, not {FORMAT_NAME!r}: not a moeq checkpoint")
        check_version({"version": qc.version}, "config.json")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        # Runs before transformers opens any weight file: a corrupt or truncated file, or a
        # config.json that does not match the tensors, is one clear error naming it.
        self.tensor_files = {}
        if checkpoint_files:
            self.tensor_files = verify_files(self.quantization_config.to_dict(), list(checkpoint_files),
                                             want_checksums())
        replace_modules(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_finite(model, getattr(self, "tensor_files", {}))
        model.quantization_info = self.quantization_config.to_dict()
        return model

    def is_serializable(self, *args, **kwargs):
        return False   # a packed checkpoint is written by quant/format.py, not by save_pretrained

    @property
    def is_trainable(self):
        return False


def replace_modules(model, qc: MoeqConfig) -> None:
    """Swap every module of ``qc.modules`` (on meta) for a QuantLinear / QuantExperts."""
    from torch import nn

    from .quant.modules import QuantLinear, experts_class
    experts: dict[str, dict] = {}
    for path, spec in qc.modules.items():
        rows, cols = spec["shape"]
        if isinstance(spec["bits"], list):
            parent, _, kind = path.rpartition(".")
            experts.setdefault(parent, {})[kind] = (rows, cols, spec["bits"])
            continue
        old = _submodule(model, path)
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (rows, cols):
            raise FormatError(f"config.json quantization_config: module {path} is {_describe(old)} in this model, "
                              f"not a {rows} x {cols} linear: the config does not match the model")
        model.set_submodule(path, QuantLinear(cols, rows, spec["bits"], qc.group_size, old.bias is not None,
                                              dtype=old.weight.dtype))
    for parent, specs in experts.items():
        old = _submodule(model, parent)
        for kind, (rows, cols, bits) in specs.items():
            stock = getattr(old, kind, None)
            if stock is None or stock.shape[0] != len(bits) or sorted(stock.shape[1:]) != sorted((rows, cols)):
                raise FormatError(f"config.json quantization_config: {parent}.{kind} has {len(bits)} experts of "
                                  f"{rows} x {cols}, the model's is {_describe(stock)}: the config does not match "
                                  f"the model")
        has_bias = any(getattr(old, f"{k}_bias", None) is not None for k in specs)
        config = getattr(old, "config", None) or model.config.get_text_config()
        model.set_submodule(parent, experts_class("gate_up_proj" in specs, has_bias)(config, specs, qc.group_size,
                                                                                    old))


def check_finite(model, tensor_files: dict[str, str]) -> None:
    """Scales, zeros and every unquantized tensor must be finite: a NaN there would reach
    every logit (checked where the tensors now live, so on the GPU it is fast)."""
    import itertools

    import torch
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise FormatError(f"tensor {name} ({tensor_files.get(name, 'the weight files')}) contains NaN or inf: "
                              f"the checkpoint is corrupt; copy it again or quantize again")


def _submodule(model, path):
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise FormatError(f"config.json quantization_config names module {path}, which {type(model).__name__} "
                          f"does not have: the config does not match the model") from None


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"a tensor of shape {tuple(shape)}" if shape is not None else type(x).__name__


def register() -> None:
    """Add ``moeq`` to transformers' quantization methods (idempotent)."""
    import importlib
    auto = importlib.import_module("transformers.quantizers.auto")  # may still be initialising (startup hook)
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(MoeqConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(MoeqHfQuantizer)


register()  # importing this module is enough
