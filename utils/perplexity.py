"""Windowed perplexity, the GPTQ protocol: non-overlapping windows of seqlen tokens,
each token after the first of a window predicted from the ones before it in the
window; ppl = exp(mean negative log-likelihood over all predicted tokens).
Runs block by block, so a model larger than the device still fits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .sequential import capture_block_inputs, run_block


@torch.no_grad()
def perplexity(model, family, windows: torch.Tensor, device, batch_size: int = 1, act_device=None,
               desc: str = "ppl", loader=None, keep: bool | None = None) -> float:
    """``loader``: a utils.loading.BlockLoader (streams blocks); default: blocks in memory."""
    from .loading import BlockLoader
    act_device = act_device or device
    loader = loader or BlockLoader(family, device)
    hidden = None
    for stage, blocks in enumerate(family.stages(model)):
        hidden, kwargs = capture_block_inputs(model, family, windows, batch_size, device, act_device, stage, hidden)
        for name, block in tqdm(blocks, desc=desc, leave=False, disable=None):  # no bar when not a terminal
            with loader.block(name, block, keep=keep):
                hidden = run_block(block, hidden, kwargs, device, act_device, family=family)
    post = family.post_block_modules(model)
    homes = [next(m.parameters()).device for m in post]
    for m in post:
        m.to(device)
    nll, count = 0.0, 0
    for i, h in enumerate(hidden):
        logits = family.head(model, h.to(device)).float()
        ids = windows[i * batch_size:(i + 1) * batch_size].to(device)
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += ids[:, 1:].numel()
    for m, home in zip(post, homes):
        m.to(home)
    return math.exp(nll / count)
