"""Several processes quantizing one model together, with torch.distributed.

    torchrun --nproc_per_node N quantize_mixtral.py ...     (NCCL on GPUs, gloo on the CPU)

Every rank runs the same pipeline on the same model, block by block; what differs is which
part of each block's work it does (``Ranks``):

- forward passes: calibration batch b runs on rank b % N (batches interleaved, so that step
  i of every rank together holds the global batches iN .. iN + N - 1, in order);
- Hessians: each one is accumulated by the rank that quantizes its matrix, from the inputs
  of *every* batch, added in global batch order. The inputs travel (routed tokens, the
  inputs of attention linears), not partial Hessians: a sum of partial Hessians rounds
  differently from one running sum, and a layer's routed tokens are fewer bytes than its
  expert Hessians (DeepSeek-V3: 3.7 GB against 56 GB per layer);
- GPTQ: the experts of a MoE layer in N contiguous ranges, one per rank; groups of
  linears that read the same input (q/k/v, o, a shared expert's gate/up ...) round robin;
- results: codes, scales, zero points and losses go from their rank to every rank, which
  dequantizes them (the same elementwise math as GPTQ's own dequantization), so every
  rank continues with the same weights and the next block's inputs; rank 0 writes.

So N ranks write the checkpoint one process writes, bit for bit, given the same per-process
arithmetic (device type, kernels, threads). ``Ranks()`` is the one-process case: every
method is then the identity, and the pipeline runs as it always did.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..config import ConfigError


class RankError(ConfigError):
    """A setting that fails on one rank only (its GPU, say); that rank reports it."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")   # where this rank computes
    comm: torch.device = torch.device("cpu")     # where its tensors travel (NCCL: the GPU; gloo: the host)
    owns_group: bool = False                     # the process group was made here (and is destroyed here)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- who does what --
    def batches(self, num_batches: int) -> list[int]:
        """The calibration batches this rank runs."""
        return list(range(self.rank, num_batches, self.size))

    def experts(self, num_experts: int, rank: int | None = None) -> range:
        """The experts of a MoE layer that ``rank`` (default: this one) quantizes."""
        r = self.rank if rank is None else rank
        return range(r * num_experts // self.size, (r + 1) * num_experts // self.size)

    def owner(self, index: int) -> int:
        """The rank that quantizes the ``index``-th group of linears of a block."""
        return index % self.size

    def check_split(self, num_experts: list[int], num_batches: int, batch_size: int) -> None:
        """Every rank needs at least one expert of every MoE layer and one calibration batch."""
        if not self.distributed:
            return
        if num_experts and min(num_experts) < self.size:
            raise ConfigError(f"{self.size} ranks, but a MoE layer of this model has {min(num_experts)} experts: "
                              f"the experts of a layer are split across ranks: start at most {min(num_experts)} "
                              f"(torchrun --nproc_per_node)")
        if num_batches < self.size:
            raise ConfigError(f"{self.size} ranks, but --nsamples with --batch_size {batch_size} makes {num_batches} "
                              f"calibration batch(es): each rank runs its own batches: raise --nsamples, lower "
                              f"--batch_size, or start fewer ranks")

    # -- communication (the identity for one process) --
    def in_batch_order(self, kept: list[tuple[torch.Tensor, ...]], dst: int | None = None):
        """Yields the batches every rank kept (each a tuple of tensors with as many rows, the
        rows of one calibration batch), in global batch order: on every rank (``dst`` None) or
        on rank ``dst`` only. Batches without rows are left out. ``kept`` is not empty."""
        if not self.distributed:
            yield from (b for b in kept if b[0].shape[0])
            return
        empty = tuple(t[:0] for t in kept[0])
        for i in range(self.agree_max(len(kept))):
            parts = self._gather_rows(kept[i] if i < len(kept) else empty, dst)
            yield from (p for p in parts if p[0].shape[0])

    def share(self, payload, src: int) -> dict[str, torch.Tensor]:
        """``payload`` (name -> tensor) of rank ``src`` on every rank, on this rank's device.
        An exception as payload is raised on every rank instead (one failure, one message)."""
        import torch.distributed as dist
        if not self.distributed:
            if isinstance(payload, BaseException):
                raise payload
            return payload
        meta = [None]
        if self.rank == src:
            meta = [payload if isinstance(payload, BaseException) else
                    {k: (tuple(v.shape), v.dtype) for k, v in payload.items()}]
        dist.broadcast_object_list(meta, src=src, device=self.comm)
        if isinstance(meta[0], BaseException):
            raise meta[0]
        out = {}
        for name, (shape, dtype) in meta[0].items():
            buf = _bytes(payload[name].to(self.comm)) if self.rank == src else \
                torch.empty(_nbytes(shape, dtype), dtype=torch.uint8, device=self.comm)
            dist.broadcast(buf, src=src)
            out[name] = payload[name] if self.rank == src else buf.view(dtype).reshape(shape).to(self.device)
        return out

    def on_main(self, work):
        """``work()`` on rank 0 (opening the output, say); a ConfigError it raises is raised
        on every rank, so that none waits for the others in vain."""
        error = None
        if self.main:
            try:
                work()
            except ConfigError as e:
                error = e
        if self.distributed:
            self.share(error if error is not None else {}, 0)
        elif error is not None:
            raise error

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` of all ranks (e.g. experts that fit every GPU at once)."""
        return -self.agree_max(-value)

    def agree_max(self, value: int) -> int:
        """The largest ``value`` of all ranks."""
        import torch.distributed as dist
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def _gather_rows(self, tensors: tuple[torch.Tensor, ...], dst: int | None) -> list[tuple]:
        """Every rank's ``tensors`` (row counts may differ between ranks), in rank order; on
        ``dst`` only when given (an empty list elsewhere). Padded to the most rows to travel."""
        import torch.distributed as dist
        count = torch.tensor([tensors[0].shape[0]], dtype=torch.long, device=self.comm)
        counts = [torch.empty_like(count) for _ in range(self.size)]
        dist.all_gather(counts, count)
        counts = [int(c) for c in counts]
        most, here = max(counts), dst is None or dst == self.rank
        gathered = []
        for t in tensors:
            padded = t.new_zeros((most, *t.shape[1:]), device=self.comm)
            padded[:t.shape[0]] = t
            bufs = [torch.empty_like(_bytes(padded)) for _ in range(self.size)] if here else None
            if dst is None:
                dist.all_gather(bufs, _bytes(padded))
            else:
                dist.gather(_bytes(padded), bufs, dst=dst)
            if here:
                gathered.append([b.view(t.dtype).reshape(padded.shape)[:n].to(self.device)
                                 for b, n in zip(bufs, counts)])
        return list(zip(*gathered)) if here else []


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (any dtype travels as uint8: gloo lacks some, e.g. bool)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


# -- starting and stopping --

def start(device_name: str | None, timeout_minutes: float = 60) -> tuple[Ranks, torch.device | None]:
    """The ranks of this run and this rank's device: one process (``Ranks()``, device None:
    the caller resolves ``device_name`` as usual), the process group that torchrun describes
    (WORLD_SIZE > 1 in the environment; initialized here, NCCL for GPUs, gloo for the CPU),
    or the group the caller initialized (its backend decides where tensors travel)."""
    import torch.distributed as dist
    made = dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not (made or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)):
        return Ranks(), None
    rank = int(os.environ["RANK"]) if made else dist.get_rank()
    size = int(os.environ["WORLD_SIZE"]) if made else dist.get_world_size()
    device = _rank_device(device_name, rank, os.environ.get("LOCAL_RANK"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if made:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if device.type == "cuda" else {}))
    try:
        backend = dist.get_backend()
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError(f"--device {device}: the process group uses NCCL, which moves GPU tensors only: use "
                              f"--device cuda, or a gloo process group for the CPU")
        ranks = Ranks(rank, size, device, device if backend == "nccl" else torch.device("cpu"), made)
        _check_distinct_gpus(ranks)
    except BaseException:
        if made:
            dist.destroy_process_group()
        raise
    return ranks, device


def stop(ranks: Ranks, wait: bool = True) -> None:
    """Ends the process group this run started. ``wait``: every rank gets here first (a
    barrier), so that none closes its gloo connections while a peer still finishes its last
    exchange, which aborts that peer ("terminate called without an active exception"); not
    after a failure, where a peer may never come."""
    import torch.distributed as dist
    if ranks.owns_group and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _rank_device(name: str | None, rank: int, local_rank: str | None) -> torch.device:
    """cpu, or the GPU of this rank: cuda:LOCAL_RANK under torchrun; an explicit cuda:K must
    be that one (with a process group of the caller's and no LOCAL_RANK, any)."""
    if name == "cpu" or (name is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RankError(f"rank {rank}: --device {name}: no CUDA GPU is visible to torch here: use --device cpu")
    want = torch.device(name or "cuda")
    local = int(local_rank) if local_rank is not None else want.index
    if local is None:
        raise RankError(f"rank {rank}: --device {want}: which GPU? pass cuda:K (each rank its own) or start the "
                        f"ranks with torchrun, which sets LOCAL_RANK")
    if want.index is not None and want.index != local:
        raise RankError(f"rank {rank}: --device {want}, but its local rank is {local}: with torchrun each rank "
                        f"computes on cuda:LOCAL_RANK: pass --device cuda (or leave --device out)")
    if local >= torch.cuda.device_count():
        raise RankError(f"rank {rank}: local rank {local} needs GPU cuda:{local}, but {torch.cuda.device_count()} "
                        f"GPU(s) are visible: start at most {torch.cuda.device_count()} ranks per machine "
                        f"(torchrun --nproc_per_node)")
    return torch.device("cuda", local)


def _check_distinct_gpus(ranks: Ranks) -> None:
    """Two ranks on one GPU would be a slower single GPU, and could run out of its memory."""
    import torch.distributed as dist
    where = [None] * ranks.size
    dist.all_gather_object(where, (socket.gethostname(), str(ranks.device)))
    for r, (host, dev) in enumerate(where):
        if dev != "cpu" and where.index((host, dev)) != r:
            raise ConfigError(f"ranks {where.index((host, dev))} and {r} both compute on {dev} of {host}: give "
                              f"each rank its own GPU (torchrun does: --device cuda)")
