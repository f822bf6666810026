"""Wall time per stage of a script, printed as it ends ("stage NAME: N s", one line each), so
that the log of one run on a lent GPU tells where its time went; and the milliseconds of one
call (``call_ms``)."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def call_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events around it on a CUDA device (the GPU's
    time for the work it queued, waited for), the wall clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


class Stages:
    """``with stages("quantize"): ...`` times the block (CUDA work included: the device is
    synchronised at its end) and prints its line; ``seconds`` keeps every stage's total."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            seconds = time.time() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            print(f"stage {self.prefix}{name}: {seconds:.1f} s", flush=True)
