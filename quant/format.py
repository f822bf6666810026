"""The packed checkpoint format (version 2): the one place it is written and read.

A packed checkpoint is a directory:

- ``config.json``: the model's transformers config plus ``quantization_config``::

    {"quant_method": "moeq", "format": "moeq-packed", "version": 2, "group_size": G, "sym": bool,
     "modules": {module path: {"bits": b, "shape": [R, C]}                      (a linear)
                              | {"bits": [b_0, ..., b_E-1], "shape": [R, C]}},  (fused experts, one width each)
     "checksums": {weight file: sha256 hex}}

  A fused-experts entry is named by the experts parameter it replaces, e.g.
  ``model.layers.3.mlp.experts.gate_up_proj`` (E experts, each R x C, in the
  (out, in) orientation whatever the model stores).
- weight files: ``model.safetensors``, or ``model-XXXXX-of-YYYYY.safetensors`` with the
  standard ``model.safetensors.index.json``. No pickle anywhere.
- ``bit_allocation.json`` (expert orders, scores, bits), ``results.json`` (the run),
  tokenizer files.

Tensors (G = C / group_size groups per row; b bits; codes and zero points are packed by
quant/packing.pack_codes: 8 codes of b bits in b bytes, rows padded to a multiple of 8):

- quantized linear ``P`` (R x C):
    ``P.weight``       int8 (R, ceil(C/8)*b)   packed codes (the bytes, read as uint8)
    ``P.weight_scale`` float16 (R, G)
    ``P.weight_zero``  int8 (R, ceil(G/8)*b)   packed integer zero points     (b >= 2)
                       float16 (R, G)          binary-code offsets            (b == 1)
- fused experts ``P`` (E x R x C, expert e at b_e bits):
    ``P``              int8, 1-D: the experts' packed codes, (R, ceil(C/8)*b_e) each,
                       concatenated in expert order
    ``P_scale``        float16 (E, R, G)
    ``P_zero``         int8, 1-D: the experts' zero points concatenated in expert order:
                       (R, ceil(G/8)*b_e) packed bytes for b_e >= 2, the (R, G) float16
                       offsets as 2*R*G little-endian bytes for b_e == 1
- every other tensor (embeddings, norms, routers, biases, lm_head) as it is.

Dequantized weight: W[r, c] = scale[r, g] * (q[r, c] - zero[r, g]), g = c // group_size, in
float32, then cast (quant/quantizer.py makes the codes; for b == 1, q is the sign bit).

Why these names: a packed tensor sits under the name of the parameter it replaces, with
another shape, so stock transformers without moeq refuses the checkpoint with a size
mismatch error instead of loading random weights (only an all-8-bit linear would have
its shape, and every MoE checkpoint has packed experts).

Version 1 (moeq 0.1) stored ``P.qweight`` / ``P.scales`` / ``P.qzeros`` | ``P.zeros`` per
linear and per expert (``P.{e}.qweight`` ...); ``upgrade_v1`` rewrites it as version 2.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from .packing import pack_codes, packed_width, unpack_codes

QUANT_METHOD = "moeq"
FORMAT_NAME = "moeq-packed"
FORMAT_VERSION = 2
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class FormatError(ValueError):
    """A directory that is not a readable packed checkpoint; the message names the file and the fix."""


# ---- layouts ------------------------------------------------------------------------

def num_groups(cols: int, groupsize: int) -> int:
    return 1 if groupsize <= 0 else cols // groupsize


def zero_bytes(rows: int, groups: int, bits: int) -> int:
    return rows * groups * 2 if bits == 1 else rows * packed_width(groups, bits)


def stored_bits(rows: int, cols: int, bits: int, groupsize: int) -> int:
    """Bits one quantized (rows x cols) matrix takes in this format: packed codes, fp16
    scales and zero points (row padding included), i.e. what "bits per weight" costs."""
    groups = num_groups(cols, groupsize)
    return 8 * (rows * packed_width(cols, bits) + rows * groups * 2 + zero_bytes(rows, groups, bits))


@dataclass(frozen=True)
class ExpertsLayout:
    """Where each expert's codes and zeros lie in the flat ``P`` / ``P_zero`` tensors."""
    rows: int
    cols: int
    groups: int
    bits: tuple[int, ...]

    def code_offsets(self) -> list[int]:
        return _offsets([self.rows * packed_width(self.cols, b) for b in self.bits])

    def zero_offsets(self) -> list[int]:
        return _offsets([zero_bytes(self.rows, self.groups, b) for b in self.bits])

    def codes(self, flat: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's packed codes as uint8 (R, ceil(C/8)*b)."""
        o = self.code_offsets()
        return flat[o[e]:o[e + 1]].view(torch.uint8).view(self.rows, -1)

    def zero(self, flat: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's zero points as float32 (R, G)."""
        o = self.zero_offsets()
        return decode_zero(flat[o[e]:o[e + 1]].view(self.rows, -1), self.bits[e], self.groups)


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def encode_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., R, G) zero points -> their stored bytes as int8 (..., R, nbytes)."""
    if bits == 1:
        return zero.to(torch.float16).contiguous().view(torch.int8)
    return pack_codes(zero.round().to(torch.uint8), bits).view(torch.int8)


def decode_zero(stored: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Inverse of encode_zero, as float32 (R, G)."""
    if bits == 1:
        raw = stored if stored.dtype == torch.float16 else stored.contiguous().view(torch.float16)
        return raw.float()
    return unpack_codes(stored.view(torch.uint8), bits, groups).float()


def linear_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """One quantized (R, C) matrix -> suffix -> tensor ("weight", "weight_scale", "weight_zero")."""
    stored_zero = encode_zero(zero, bits)
    return {"weight": pack_codes(codes, bits).view(torch.int8),
            "weight_scale": scale.to(torch.float16).contiguous(),
            "weight_zero": stored_zero.view(torch.float16) if bits == 1 else stored_zero}


def linear_names(path: str) -> list[str]:
    return [f"{path}.{s}" for s in ("weight", "weight_scale", "weight_zero")]


def experts_names(path: str) -> list[str]:
    return [path + s for s in ("", "_scale", "_zero")]


def expected_shapes(path: str, spec: dict, groupsize: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, for a module of quantization_config["modules"]."""
    rows, cols = spec["shape"]
    groups = num_groups(cols, groupsize)
    bits = spec["bits"]
    if isinstance(bits, list):
        layout = ExpertsLayout(rows, cols, groups, tuple(bits))
        return dict(zip(experts_names(path), [(layout.code_offsets()[-1],), (len(bits), rows, groups),
                                              (layout.zero_offsets()[-1],)]))
    zshape = (rows, groups) if bits == 1 else (rows, packed_width(groups, bits))
    return dict(zip(linear_names(path), [(rows, packed_width(cols, bits)), (rows, groups), zshape]))


# ---- writing ------------------------------------------------------------------------

class PackedWriter:
    """Receives quantized matrices and unquantized tensors (the pipeline's sink), turns them
    into the tensors above, and records the quantization_config's module table and the
    size accounting. Subclasses decide where tensors go (``_put``)."""

    def __init__(self, groupsize: int, sym: bool):
        self.groupsize, self.sym = groupsize, sym
        self.modules: dict[str, dict] = {}
        self.code_bits = self.overhead_bits = self.unquantized_bytes = 0
        self._parts: dict[str, dict] = {}   # experts quantized in chunks: final tensors, filled as they come

    def add_linear(self, path: str, codes, scale, zero, bits: int) -> None:
        for suffix, t in linear_tensors(codes, scale, zero, bits).items():
            self._put(f"{path}.{suffix}", t.cpu())
        self._account(path, tuple(codes.shape), bits)

    def add_experts(self, path: str, codes, scale, zero, bits: list[int], first: int = 0,
                    all_bits: list[int] | None = None) -> None:
        """Experts ``first`` .. ``first + len(bits) - 1`` of the layer whose experts have the
        widths ``all_bits`` (default ``bits``: these are all). Each expert's bytes are copied
        straight to their place in the final tensors (no per-expert pieces joined later: a
        DeepSeek-V3 layer's are ~2.8 GB), which are written once every expert has come."""
        all_bits = list(bits) if all_bits is None else list(all_bits)
        if list(bits) != all_bits[first:first + len(bits)]:
            raise ValueError(f"{path}: experts {first}.. have widths {list(bits)}, the layer says "
                             f"{all_bits[first:first + len(bits)]}")
        rows, cols = codes.shape[1:]
        if path not in self._parts:
            layout = ExpertsLayout(rows, cols, scale.shape[-1], tuple(all_bits))
            self._parts[path] = {"layout": layout, "done": set(),
                                 "codes": torch.empty(layout.code_offsets()[-1], dtype=torch.int8),
                                 "scale": torch.empty(len(all_bits), rows, scale.shape[-1], dtype=torch.float16),
                                 "zero": torch.empty(layout.zero_offsets()[-1], dtype=torch.int8)}
        part = self._parts[path]
        co, zo = part["layout"].code_offsets(), part["layout"].zero_offsets()
        for b in sorted(set(bits)):   # packed on arrival, the experts of one width together
            idx = [i for i, x in enumerate(bits) if x == b]
            packed, zeros = pack_codes(codes[idx], b).view(torch.int8), encode_zero(zero[idx], b)
            for j, i in enumerate(idx):
                e = first + i
                part["codes"][co[e]:co[e + 1]].copy_(packed[j].reshape(-1))
                part["zero"][zo[e]:zo[e + 1]].copy_(zeros[j].reshape(-1))
                part["done"].add(e)
        part["scale"][first:first + len(bits)].copy_(scale.to(torch.float16))
        if len(part["done"]) < len(all_bits):
            return
        del self._parts[path]
        self._put(path, part["codes"])
        self._put(path + "_scale", part["scale"])
        self._put(path + "_zero", part["zero"])
        self._account(path, (rows, cols), all_bits)

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        """An unquantized tensor (norms, routers, embeddings ...), stored as it is."""
        self.unquantized_bytes += t.numel() * t.element_size()
        self._put(name, t.detach().to("cpu", copy=True).contiguous())

    def _account(self, path, shape, bits):
        self.modules[path] = {"bits": bits, "shape": list(shape)}
        rows, cols = shape
        groups = num_groups(cols, self.groupsize)
        for b in bits if isinstance(bits, list) else [bits]:
            self.code_bits += rows * cols * b
            self.overhead_bits += rows * groups * (16 + (16 if b == 1 else b))   # fp16 scale + zero

    def quantization_config(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format": FORMAT_NAME, "version": FORMAT_VERSION,
                "group_size": self.groupsize, "sym": self.sym, "modules": dict(self.modules)}

    def sizes(self) -> dict:
        """Theoretical bytes: params x bits + fp16 scale and zero (b bits, or fp16 for b == 1)
        per group + unquantized tensors."""
        theory = self.code_bits / 8 + self.overhead_bits / 8 + self.unquantized_bytes
        return {"theoretical_bytes": theory, "code_bytes": self.code_bits / 8,
                "overhead_bytes": self.overhead_bits / 8, "unquantized_bytes": self.unquantized_bytes}

    def _put(self, name: str, t: torch.Tensor) -> None:
        raise NotImplementedError


class MemoryWriter(PackedWriter):
    """Keeps every tensor in ``self.tensors`` (tests, small models)."""

    def __init__(self, groupsize: int, sym: bool):
        super().__init__(groupsize, sym)
        self.tensors: dict[str, torch.Tensor] = {}

    def _put(self, name, t):
        self.tensors[name] = t


QUEUED_SHARDS = 2


class ShardWriter(PackedWriter):
    """Writes tensors to safetensors shards of at most ``max_shard_size`` bytes as they come,
    so a packed model is never in memory at once. Full shards are written (and hashed) by a
    background thread while the next one fills; at most QUEUED_SHARDS wait or are being
    written, so host RAM holds at most QUEUED_SHARDS + 1 shards, and a layer's burst of packed
    experts (a DeepSeek-V3 layer: ~2.9 GB at 2 bits, ~4 s of a 0.8 GB/s disk) is written while
    the next layer is quantized instead of holding it up. ``finish`` names the shards, writes the
    index, config.json and the checksums."""

    def __init__(self, out_dir: str, groupsize: int, sym: bool, max_shard_size: int):
        super().__init__(groupsize, sym)
        self.out_dir, self.limit = out_dir, max_shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._hashes = {}   # shard -> future of its write, whose result is the file's sha256

    def _put(self, name, t):
        if name in self.weight_map or name in self.pending:
            raise ValueError(f"tensor {name} written twice")
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.limit:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        fname = f".shard-{len(self.files):05d}.safetensors"
        if len(self.files) >= QUEUED_SHARDS:   # bounds host RAM; an error a write met is raised here
            self._hashes[self.files[-QUEUED_SHARDS]].result()
        self._hashes[fname] = _background().submit(_write_shard, self.pending, os.path.join(self.out_dir, fname))
        self.weight_map.update({k: fname for k in self.pending})
        self.files.append(fname)
        self.pending, self.pending_bytes = {}, 0

    def abandon(self) -> None:
        """After a failure: waits for the shard being written (errors ignored), so that no
        write lands in a folder the caller is about to remove."""
        from concurrent.futures import wait
        wait(list(self._hashes.values()))

    def finish(self, model_config: dict) -> dict:
        """Final shard names, index, config.json (``model_config`` + quantization_config).
        Returns the size figures, with ``disk_bytes`` and ``files``."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        final = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        hashes = {old: future.result() for old, future in self._hashes.items()}   # before the files move
        for old, new in zip(self.files, final):
            os.rename(os.path.join(self.out_dir, old), os.path.join(self.out_dir, new))
        rename = dict(zip(self.files, final))
        if n > 1:
            write_json({"metadata": {"total_size": self.total},
                        "weight_map": {k: rename[v] for k, v in self.weight_map.items()}},
                       os.path.join(self.out_dir, INDEX))
        qc = self.quantization_config()
        qc["checksums"] = {new: hashes[old] for old, new in rename.items()}
        write_json({**model_config, "quantization_config": qc}, os.path.join(self.out_dir, "config.json"))
        disk = sum(os.path.getsize(os.path.join(self.out_dir, f)) for f in final)
        return {**self.sizes(), "disk_bytes": disk, "files": final}


def _background():
    """One background thread that writes shards and hashes them, in order (safetensors and
    hashlib release the GIL on large writes and reads)."""
    from concurrent.futures import ThreadPoolExecutor
    global _WRITER
    if _WRITER is None:
        _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeq-shards")
    return _WRITER


_WRITER = None


def _write_shard(tensors: dict[str, torch.Tensor], path: str) -> str:
    from safetensors.torch import save_file
    save_file(tensors, path, metadata={"format": "pt"})
    return file_sha256(path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# ---- reading ------------------------------------------------------------------------

def read_quantization_config(path: str) -> dict:
    """The checkpoint's quantization_config, checked to be ours and of a readable version."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FormatError(f"{cfg_path} not found: {path} is not a model checkpoint directory")
    try:
        with open(cfg_path) as f:
            qc = json.load(f).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise FormatError(f"{cfg_path} is not valid JSON ({e}): the checkpoint is damaged; copy it again") from None
    if not isinstance(qc, dict) or qc.get("format") != FORMAT_NAME:
        raise FormatError(f"{cfg_path} has no '{FORMAT_NAME}' quantization_config: {path} is not a packed moeq "
                          f"checkpoint (make one with quantize_mixtral.py --pack --save)")
    check_version(qc, cfg_path)
    return qc


def check_version(qc: dict, where: str) -> None:
    version = qc.get("version")
    if version == 1:
        raise FormatError(f"{where}: packed format version 1 (moeq 0.1): rewrite it as version {FORMAT_VERSION} "
                          f"with `python -m moeq.quant.format upgrade OLD_DIR NEW_DIR`")
    if version != FORMAT_VERSION:
        raise FormatError(f"{where}: packed format version {version} is not supported by this moeq (it reads "
                          f"version {FORMAT_VERSION}); upgrade moeq or re-quantize")


def read_index(path: str) -> dict[str, str] | None:
    """The index's weight_map (tensor name -> file name), None if ``path`` has no index."""
    index = os.path.join(path, INDEX)
    if not os.path.isfile(index):
        return None
    try:
        with open(index) as f:
            return json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise FormatError(f"{index} is damaged ({e}): copy the checkpoint again") from None


def weight_files(path: str) -> dict[str, str]:
    """tensor name -> file, from the index or the single model.safetensors."""
    weight_map = read_index(path)
    if weight_map is not None:
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if not os.path.isfile(single):
        raise FormatError(f"{single} not found (nor {INDEX}): the checkpoint has no weights")
    return {k: single for k in read_header(single)}


def read_header(fname: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors file's header (no tensor is read)."""
    from safetensors import safe_open
    try:
        with safe_open(fname, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # truncated or not a safetensors file
        raise FormatError(f"cannot read {fname} ({str(e).splitlines()[0]}): the file is truncated or corrupt; "
                          f"copy it again") from None


def verify_files(qc: dict, files: list[str], checksums: bool = True) -> dict[str, str]:
    """Every weight file exists, matches its checksum in config.json (``checksums``; the
    slow part: it reads every byte) and has a readable header whose packed tensors have the
    shapes the quantization_config implies. Raises a FormatError naming the file; returns
    tensor name -> file."""
    expected = qc.get("checksums") or {}
    shapes: dict[str, tuple[int, ...]] = {}
    for fname in files:
        if not os.path.isfile(fname):
            raise FormatError(f"weight file {fname} is missing: copy the whole checkpoint again")
        if checksums and os.path.basename(fname) in expected and \
                _sha256_once(fname) != expected[os.path.basename(fname)]:
            raise FormatError(f"{fname} does not match its sha256 in config.json: the file is corrupt or truncated; "
                              f"copy it again (MOEQ_VERIFY=0 skips this check)")
        shapes.update({name: (shape, fname) for name, shape in read_header(fname).items()})
    for path, spec in qc.get("modules", {}).items():
        for name, want in expected_shapes(path, spec, qc["group_size"]).items():
            if name not in shapes:
                raise FormatError(f"packed tensor {name} (module {path} in config.json) is in no weight file: "
                                  f"the checkpoint is incomplete; copy it again")
            got, fname = shapes[name]
            if tuple(got) != tuple(want):
                raise FormatError(f"{name} in {fname} has shape {tuple(got)}, but config.json's quantization_config "
                                  f"(bits {spec['bits']}, shape {spec['shape']}, group_size {qc['group_size']}) "
                                  f"implies {tuple(want)}: config.json was edited or belongs to another checkpoint")
    return {name: fname for name, (_, fname) in shapes.items()}


def verify_checkpoint(path: str, checksums: bool | None = None) -> dict:
    """read_quantization_config + verify_files on every weight file; returns the config.
    ``checksums`` None: on unless the environment sets MOEQ_VERIFY=0."""
    qc = read_quantization_config(path)
    files = sorted(set(weight_files(path).values()))
    verify_files(qc, files, want_checksums() if checksums is None else checksums)
    return qc


_HASHED: dict[tuple, str] = {}


def _sha256_once(fname: str) -> str:
    """file_sha256, remembered for this process while the file is unchanged (a load that
    verified first and then went through from_pretrained reads the bytes once)."""
    st = os.stat(fname)
    key = (os.path.realpath(fname), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(fname)
    return _HASHED[key]


def want_checksums() -> bool:
    return os.environ.get("MOEQ_VERIFY", "1") != "0"


def upgrade_v1(src: str, dst: str) -> None:
    """Rewrite a version-1 packed checkpoint as version 2 (same weights, new layout)."""
    import shutil

    from safetensors import safe_open
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    qc = config["quantization_config"]
    if qc.get("version") != 1:
        raise FormatError(f"{src} is not a version-1 packed checkpoint (version {qc.get('version')})")
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_files(src).values())):
        with safe_open(fname, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    gs = qc["group_size"]
    os.makedirs(dst, exist_ok=False)
    writer = ShardWriter(dst, gs, qc.get("sym", False), 5 * 10**9)
    for path, spec in qc["modules"].items():
        bits = spec["bits"]
        parts = [f"{path}.{e}." for e in range(len(bits))] if isinstance(bits, list) else [f"{path}."]
        codes, scales, zeros = [], [], []
        for p, b in zip(parts, bits if isinstance(bits, list) else [bits]):
            scale = tensors.pop(p + "scales")
            rows, groups = scale.shape
            qweight = tensors.pop(p + "qweight")
            cols = _v1_cols(qweight.shape[1], b, gs, groups)
            codes.append(unpack_codes(qweight, b, cols))
            scales.append(scale.float())
            zeros.append(tensors.pop(p + "zeros").float() if b == 1 else
                         unpack_codes(tensors.pop(p + "qzeros"), b, groups).float())
        if isinstance(bits, list):
            writer.add_experts(path, torch.stack(codes), torch.stack(scales), torch.stack(zeros), bits)
        else:
            writer.add_linear(path, codes[0], scales[0], zeros[0], bits)
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    del config["quantization_config"]
    writer.finish(config)
    for fname in os.listdir(src):
        if not fname.endswith(".safetensors") and fname not in ("config.json", INDEX):
            shutil.copy2(os.path.join(src, fname), os.path.join(dst, fname))


def _v1_cols(width: int, bits: int, groupsize: int, groups: int) -> int:
    # v1 did not store shapes: the column count is the group size times the groups
    # (or, for one group per row, the packed width's code count).
    return groupsize * groups if groupsize > 0 else width // bits * 8


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m moeq.quant.format", description="packed checkpoint tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upgrade", help="rewrite a version-1 packed checkpoint as the current version")
    up.add_argument("src")
    up.add_argument("dst")
    a = ap.parse_args(argv)
    try:
        upgrade_v1(a.src, a.dst)
    except (FormatError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {a.dst} (packed format version {FORMAT_VERSION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
