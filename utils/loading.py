"""Streaming a checkpoint block by block.

The model is built from its config with parameters on the meta device (buffers such as
rotary frequencies are real: they are not in checkpoints). ``BlockLoader.block(...)``
reads one block's tensors from the safetensors shards straight to the compute device,
and afterwards either keeps the block (on the host) or drops it back to meta, so host
RAM holds about one block, not the model.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from ..config import HUB_ID, ConfigError

MODEL_ALIASES = {
    "Mixtral8x7B": "mistralai/Mixtral-8x7B-v0.1",
    "Mixtral8x22B": "mistralai/Mixtral-8x22B-v0.1",
}


class BadWeights(ValueError):
    """A checkpoint tensor that cannot be quantized (NaN / inf, wrong shape)."""


class TensorSource:
    """Named tensors of a local safetensors checkpoint (single file or sharded with index).
    Every weight file's header is read when it is opened, so a missing, truncated or corrupt
    file is found before any work (FormatError naming it), not when its block is reached."""

    def __init__(self, path: str):
        from ..quant.format import INDEX, SINGLE, FormatError, read_header, read_index
        self.path = path
        index = os.path.join(path, INDEX)
        weight_map = read_index(path)
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, SINGLE)):
            files = [SINGLE]
        else:
            raise FileNotFoundError(f"{path} has no {SINGLE} or {INDEX}: convert the checkpoint to safetensors")
        self.files, self.shapes = {}, {}
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.isfile(full):
                raise FormatError(f"weight file {full} (listed in {index}) is missing: copy the checkpoint again")
            header = read_header(full)
            self.files.update({k: full for k in header})
            self.shapes.update(header)
        self._open = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def close(self) -> None:
        """Drop the open (memory-mapped) shards: mapped pages count as host RSS."""
        self._open.clear()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        fname = self.files[name]
        if fname not in self._open:
            self._open[fname] = safe_open(fname, framework="pt", device="cpu")
        return self._open[fname].get_tensor(name)


def resolve_model(name: str, flag: str = "--model") -> str:
    """A local checkpoint directory for ``name``: a directory, an alias (MODEL_ALIASES) or a
    hub id (downloaded, safetensors only). Anything else is a ConfigError naming ``flag``."""
    name = MODEL_ALIASES.get(name, name)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ConfigError(f"{flag} {name} has no config.json: pass a transformers checkpoint directory")
        return name
    if os.path.exists(name) or name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name):
        raise ConfigError(f"{flag} {name}: no such checkpoint directory (nor a hub id of the form org/name)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    except Exception as e:  # offline, unknown repo, gated repo: one line, not a traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{flag} {name}: could not download it from the Hugging Face hub ({reason[:160]}): "
                          f"pass a local checkpoint directory instead, or check the network and the repo id") from None


def load_skeleton(path: str, dtype, attn_implementation: str | None = None, model_class=None):
    """The model with parameters on meta. ``model_class``: an Auto class (causal LM default)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    model_class = model_class or AutoModelForCausalLM
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=dtype, **kwargs)
    return model.eval()


def materialize(module: nn.Module, prefix: str, source: TensorSource, family, device, dtype,
                only: str | None = None) -> None:
    """Read the module's parameters (or just ``only``) from ``source`` onto ``device``."""
    from accelerate.utils import set_module_tensor_to_device
    for name, p in list(module.named_parameters()):
        if only is not None and name != only:
            continue
        full = f"{prefix}.{name}" if prefix else name
        t = family.read_tensor(source, full)
        if tuple(t.shape) != tuple(p.shape):
            raise BadWeights(f"{full}: checkpoint tensor has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(p.shape)}: config.json does not match the weights")
        set_module_tensor_to_device(module, name, device, value=t, dtype=dtype)
        p = module.get_parameter(name)
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):  # checked on the device: fast
            raise BadWeights(f"weight {full} contains NaN or inf: the checkpoint is corrupt; re-download or "
                             f"re-export it")
    if only is None:
        load_buffers(module, prefix, source, family, device)


def load_buffers(module: nn.Module, prefix: str, source: TensorSource, family, device) -> None:
    """Buffers saved with the weights (e.g. DeepSeek-V3's score-correction bias) are read from
    the checkpoint in their own dtype; the others (rotary frequencies) only move to ``device``."""
    from accelerate.utils import set_module_tensor_to_device
    saved = set(module.state_dict())
    for name, buf in list(module.named_buffers()):
        full = f"{prefix}.{name}" if prefix else name
        value = buf
        if name in saved:
            try:
                value = family.read_tensor(source, full).to(buf.dtype)
            except KeyError:   # not in this checkpoint: the model's initial value, as from_pretrained does
                pass
        set_module_tensor_to_device(module, name, device, value=value)


def release(module: nn.Module) -> None:
    """Drop the module's parameters (back to meta) to free their memory."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    trim_host_heap()


def _libc():
    import ctypes
    return ctypes.CDLL("libc.so.6")


def limit_heap_retention(threshold: int = 1 << 20) -> None:
    """Serve every host allocation of ``threshold`` bytes or more by its own mmap.

    glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is
    freed, so later per-block tensors of a few MiB come from the heap; a heap fragmented
    by one block's buffers is not reused exactly by the next one, and the process's peak
    RSS crept up by ~70 MB per block on a CPU run (benchmarks/bench_quantize.py reports
    the peak per block). A fixed threshold returns such buffers to the OS on free."""
    try:
        _libc().mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixing it disables the dynamic raise)
    except (OSError, AttributeError):  # not glibc
        pass


def trim_host_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: per-block
    tensors of a few MB to tens of MB are served from the heap, not mmap)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class BlockLoader:
    """Gives each block to the caller on ``device``. In-memory models: moved there and
    back. Streamed models (``source`` set): read from the shards, then kept on the host
    (``keep``) or released."""

    def __init__(self, family, device, source: TensorSource | None = None, dtype=None, keep: bool = True):
        self.family, self.device, self.source, self.dtype, self.keep = family, device, source, dtype, keep
        if source is not None:
            limit_heap_retention()

    @contextmanager
    def block(self, name: str, block: nn.Module, keep: bool | None = None):
        keep = self.keep if keep is None else keep
        if self.source is None:
            home = next(block.parameters()).device
            block.to(self.device)
            yield block
            block.to(home)
            return
        if next(block.parameters()).device.type == "meta":
            materialize(block, name, self.source, self.family, self.device, self.dtype)
            self.source.close()
        else:
            block.to(self.device)
        yield block
        if keep:
            block.to("cpu")
        else:
            release(block)

    def materialize_rest(self, model: nn.Module) -> None:
        """Everything outside the blocks (embeddings, final norm, head) onto the host."""
        if self.source is None:
            return
        prefixes = tuple(f"{name}." for name, _ in self.family.blocks(model))
        for name, p in list(model.named_parameters()):  # tied parameters appear once
            if not name.startswith(prefixes) and p.device.type == "meta":
                materialize(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[0], self.source,
                            self.family, "cpu", self.dtype, only=name.rpartition(".")[2])
        model.tie_weights()


def router_reference_weights(path: str, model, family, flag: str = "--router_reference") -> dict[str, torch.Tensor]:
    """Router rows of a reference checkpoint (same architecture), keyed by MoE block name.
    Only the router tensors are read."""
    try:
        source = TensorSource(resolve_model(path, flag))
    except FileNotFoundError as e:
        raise ConfigError(f"{flag}: {e}") from None
    out = {}
    for name, block in family.blocks(model):
        moe = family.moe(block, name)
        if moe is None:
            continue
        try:
            ref = family.read_tensor(source, family.router_param_name(moe))
        except KeyError:
            raise ConfigError(f"{flag} {path} has no router for {moe.name}: pass a checkpoint of the "
                              f"same architecture") from None
        if tuple(ref.shape) != tuple(family.router_weight(moe).shape):
            raise ConfigError(f"{flag}: router of {moe.name} has shape {tuple(ref.shape)}, the model's "
                              f"{tuple(family.router_weight(moe).shape)}: pass a checkpoint of the same "
                              f"architecture")
        out[moe.name] = ref.float()
    return out


def check_source(model, family, source: TensorSource, flag: str = "--model") -> None:
    """Before the first block: every parameter of the model is in the weight files with the
    shape the config implies, and the files hold no layers the config does not have."""
    import re
    used = set()
    buffers = {n for n, _ in model.named_buffers()}
    for name, p in model.state_dict(keep_vars=True).items():
        try:
            where = family.locate(source, name)
        except KeyError:
            if name in buffers:   # a buffer the checkpoint lacks keeps its initial value, as in from_pretrained
                continue
            raise ConfigError(f"{flag} {source.path}: tensor {name} is in no weight file: config.json does not "
                              f"match the weights (a missing shard, or more layers in the config than were "
                              f"saved)") from None
        shape = where.shape(source)
        if tuple(shape) != tuple(p.shape):
            raise ConfigError(f"{flag} {source.path}: {name} has shape {tuple(shape)} in "
                              f"{source.files[where.names()[0]]}, but config.json implies {tuple(p.shape)}: the "
                              f"config does not match the weights")
        used.update(where.names())
    blocks = {name for name, _ in family.blocks(model)}
    pattern = re.compile("|".join(sorted({re.escape(re.sub(r"\d+$", "#", b)).replace("\\#", r"(\d+)")
                                          for b in blocks})))
    for name in sorted(set(source.files) - used):
        m = pattern.match(name)
        if m and m.group(0) not in blocks:
            raise ConfigError(f"{flag} {source.path}: the weights have {name}, a block the config does not have "
                              f"(it has {len(blocks)} blocks): config.json does not match the weights")
