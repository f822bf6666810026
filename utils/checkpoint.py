"""Writing checkpoints: atomically, dequantized (stock transformers) or packed
(the format documented in quant/packing.py)."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from quant.packing import FORMAT_NAME, FORMAT_VERSION


def check_output_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"--saving_path {path} exists and is not empty: pass --overwrite to replace it, "
                              f"or choose another path")


def temp_dir_for(path: str) -> str:
    """A fresh directory beside ``path`` (same file system, so the final rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp: str, path: str) -> None:
    """Replace ``path`` by ``tmp`` (the old content is removed only after the rename)."""
    old = None
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class ShardWriter:
    """Writes tensors to safetensors shards of at most ``max_shard_size`` as they come, so
    a packed model never has to be in memory at once; ``finish`` names the shards
    model-XXXXX-of-YYYYY (or model.safetensors when one) and writes the standard index."""

    def __init__(self, out_dir: str, max_shard_size: str | int = "5GB"):
        self.out_dir, self.limit = out_dir, _parse_size(max_shard_size)
        self.pending, self.pending_bytes, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.limit:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        fname = f".shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, os.path.join(self.out_dir, fname), metadata={"format": "pt"})
        self.weight_map.update({k: fname for k in self.pending})
        self.files.append(fname)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for old, new in zip(self.files, final):
            os.rename(os.path.join(self.out_dir, old), os.path.join(self.out_dir, new))
        rename = dict(zip(self.files, final))
        if n > 1:
            write_json({"metadata": {"total_size": self.total},
                        "weight_map": {k: rename[v] for k, v in self.weight_map.items()}},
                       os.path.join(self.out_dir, "model.safetensors.index.json"))
        return final


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_size: str | int = "5GB",
                 writer: ShardWriter | None = None) -> list[str]:
    """safetensors shards in insertion order, plus the standard index when there are several."""
    writer = writer or ShardWriter(out_dir, max_shard_size)
    for name, t in tensors.items():
        writer.add(name, t)
    return writer.finish()


def unquantized_state(model, quantized_modules) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not a quantized weight, tied copies once."""
    skip = set()
    for m in quantized_modules:
        skip.update({m, f"{m}.weight"})
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if name in skip or t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.shape) if t.numel() else None
        if key is not None and key in seen:
            continue  # tied weight (e.g. lm_head = embed_tokens): transformers re-ties on load
        seen.add(key)
        out[name] = t
    return out


def quantization_config(report, groupsize: int, sym: bool) -> dict:
    return {"quant_method": "moeq", "format": FORMAT_NAME, "version": FORMAT_VERSION, "group_size": groupsize,
            "sym": sym, "modules": {k: {"bits": v} for k, v in report.module_bits.items()}}


def save_packed(model, report, out_dir: str, groupsize: int, sym: bool, max_shard_size="5GB",
                writer: ShardWriter | None = None) -> dict:
    """Packed tensors + unquantized ones + config with quantization_config. Returns size
    figures. ``writer``: the ShardWriter the pipeline already streamed packed tensors to."""
    rest = {**unquantized_state(model, report.module_bits), **report.kept}
    tensors = {**report.packed, **rest}
    files = save_sharded(tensors, out_dir, max_shard_size, writer)
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config(report, groupsize, sym)
    write_json(cfg, os.path.join(out_dir, "config.json"))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return size_report(out_dir, files, rest, report, groupsize)


def size_report(out_dir, files, rest, report, groupsize) -> dict:
    """On-disk bytes of the weight files beside the theoretical size: params x bits,
    plus fp16 scale and b-bit zero (fp16 offset for 1 bit) per group, plus unquantized tensors."""
    disk = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    code_bits = overhead_bits = 0
    for name, bits in report.module_bits.items():
        rows, cols = report.module_shapes[name]
        groups = cols // groupsize if groupsize > 0 else 1
        for b in (bits if isinstance(bits, list) else [bits]):
            code_bits += rows * cols * b
            overhead_bits += rows * groups * (16 + (16 if b == 1 else b))
    rest_bytes = sum(t.numel() * t.element_size() for t in rest.values())
    theory = code_bits / 8 + overhead_bits / 8 + rest_bytes
    return {"disk_bytes": disk, "theoretical_bytes": theory, "code_bytes": code_bits / 8,
            "overhead_bytes": overhead_bits / 8, "unquantized_bytes": rest_bytes, "files": files}
