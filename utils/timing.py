"""Wall time per stage of a script, printed as it ends ("stage NAME: N s", one line each), so
that the log of one run on a lent GPU tells where its time went."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


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
