"""Load a packed checkpoint (format: quant/packing.py) as a transformers model.

    from inference import load_quantized_model
    model = load_quantized_model("quantized_ckpts/2p0", device_map="auto", dtype=torch.float16)

The model is built from its config on the meta device, its quantized linears and
fused experts are swapped for modules that keep the weights packed (dequantized on
the fly, one expert at a time), every tensor is read with safetensors straight to
the device it belongs on, and accelerate dispatches the blocks across GPUs when a
device map spans several devices.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from quant.modules import QuantExperts, QuantLinear
from quant.packing import FORMAT_NAME, FORMAT_VERSION


class CheckpointError(ValueError):
    """A directory that is not a readable packed checkpoint; the message names the file."""


def read_quantization_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path} not found: {path} is not a model checkpoint directory")
    with open(cfg_path) as f:
        qc = json.load(f).get("quantization_config")
    if not qc or qc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{cfg_path} has no '{FORMAT_NAME}' quantization_config: {path} is not a packed "
                              f"checkpoint (make one with quantize_mixtral.py --pack --save), or load it "
                              f"without quantized=True")
    if qc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: packed format version {qc.get('version')} is not supported by this "
                              f"toolkit (it reads version {FORMAT_VERSION}); upgrade the toolkit or re-quantize")
    return qc


def weight_files(path: str) -> dict[str, str]:
    """tensor name -> shard file, from the index or the single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for fname in set(weight_map.values()):
            if not os.path.isfile(os.path.join(path, fname)):
                raise CheckpointError(f"shard {os.path.join(path, fname)} listed in {index} is missing")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(f"{single} not found (nor model.safetensors.index.json): the checkpoint has no weights")
    with _open(single) as f:
        return {k: single for k in f.keys()}


def _open(fname):
    from safetensors import safe_open
    try:
        return safe_open(fname, framework="pt", device="cpu")
    except Exception as e:  # truncated or corrupt file
        raise CheckpointError(f"cannot read {fname}: {e} (the file is truncated or corrupt; copy it again)") from e


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def replace_quantized_modules(model: nn.Module, qc: dict, dtype) -> None:
    """Swap every module named in quantization_config for its packed counterpart (on meta)."""
    gs = qc["group_size"]
    experts: dict[str, dict[str, list[int]]] = {}
    for name, spec in qc["modules"].items():
        bits = spec["bits"]
        if isinstance(bits, list):
            parent, _, kind = name.rpartition(".")
            experts.setdefault(parent, {})[kind] = bits
            continue
        old = model.get_submodule(name)
        _swap(model, name, QuantLinear(old.in_features, old.out_features, bits, gs, old.bias is not None,
                                       dtype=dtype))
    for parent, kinds in experts.items():
        old = model.get_submodule(parent)
        if set(kinds) != {"gate_up_proj", "down_proj"}:
            raise CheckpointError(f"experts {parent}: expected gate_up_proj and down_proj in quantization_config, "
                                  f"got {sorted(kinds)}")
        _swap(model, parent, QuantExperts(old.hidden_dim, old.intermediate_dim, kinds["gate_up_proj"],
                                          kinds["down_proj"], gs, old.act_fn))


def _resolve_dtype(dtype, config):
    if dtype in (None, "auto"):
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = d if d is not None else torch.float16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def _device_of(name: str, device_map: dict) -> str | int | torch.device:
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            return device_map.get("", "cpu")
        name = name.rpartition(".")[0]


def load_quantized_model(path: str, device_map=None, dtype="auto", model_class=None, attn_implementation=None,
                         max_memory: dict | None = None):
    """device_map: None (everything on the CPU), a device ("cuda:0"), "auto" (spread
    over the visible GPUs with accelerate), or an accelerate device map dict."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = read_quantization_config(path)
    config = AutoConfig.from_pretrained(path)
    dtype = _resolve_dtype(dtype, config)
    model_class = model_class or AutoModelForCausalLM
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # Parameters on meta; buffers (rotary inv_freq) real, since they are not in the checkpoint.
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=dtype, **kwargs)
    replace_quantized_modules(model, qc, dtype)

    if device_map is None:
        device_map = {"": "cpu"}
    elif isinstance(device_map, (str, torch.device, int)) and device_map != "auto":
        device_map = {"": device_map}
    elif device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=model._no_split_modules, dtype=dtype)

    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    files = weight_files(path)
    loaded = set()
    for fname in sorted(set(files.values())):
        with _open(fname) as f:
            for name in f.keys():
                if name not in expected:
                    raise CheckpointError(f"{fname} holds tensor {name}, which this model ({type(model).__name__}) "
                                          f"does not have: the checkpoint does not match its config.json")
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {name} from {fname}: {e} (truncated or corrupt)") from e
                if t.is_floating_point() and not name.endswith((".scales", ".zeros")):
                    t = t.to(dtype)  # unquantized tensors take the compute dtype; scales stay float16
                set_module_tensor_to_device(model, name, _device_of(name, device_map), value=t)
                loaded.add(name)
    model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the weight files: {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} (a shard is missing or truncated)")
    # Non-persistent buffers (rotary) were made on the CPU: put every module where the map says.
    devices = set(map(str, device_map.values()))
    if len(devices) > 1:
        model = dispatch_model(model, device_map=device_map)
    else:
        model.to(next(iter(device_map.values())))
    model.eval()
    model.hf_device_map = device_map
    model.quantization_info = qc
    return model
