"""Load a packed checkpoint (format: quant/format.py) as a transformers model.

With moeq installed, plain transformers does it:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("quantized_ckpts/2p0", device_map="auto", dtype=torch.float16)

``load_quantized_model`` is the same call with the paper repo's name, and it first checks
that the directory is a packed checkpoint of a version this moeq reads (one clear error
instead of transformers loading unquantized weights).
"""
from __future__ import annotations

from .quant.format import FormatError, verify_checkpoint

CheckpointError = FormatError   # the name moeq 0.1 used


def load_quantized_model(path: str, device_map=None, dtype="auto", model_class=None, attn_implementation=None,
                         max_memory: dict | None = None, verify: bool | None = None, **kwargs):
    """device_map: None (CPU), a device ("cuda:0"), "auto" (spread over the visible GPUs, then
    CPU and disk), or a device map dict; dtype: the compute dtype of unquantized tensors and
    activations ("auto": the checkpoint's). model_class: an Auto class (causal LM default).
    verify: check the weight files' sha256 (default: yes, unless MOEQ_VERIFY=0); files,
    headers and shapes are always checked."""
    from transformers import AutoModelForCausalLM

    from . import hf_quantizer
    hf_quantizer.register()
    verify_checkpoint(path, verify)
    model_class = model_class or AutoModelForCausalLM
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    model = model_class.from_pretrained(path, device_map=device_map, dtype=dtype, **kwargs)
    return model.eval()


def greedy_generate(model, input_ids, max_new_tokens: int, cuda_graph: bool | None = None,
                    step_ms: list | None = None):
    """Greedy decoding with a static KV cache: ``input_ids`` (batch, prompt) -> (batch, prompt +
    max_new_tokens), the tokens ``model.generate(do_sample=False)`` gives. With ``cuda_graph``
    (default: on CUDA) one decode step (forward, argmax, cache and position updates) is
    captured once in a CUDA graph and replayed for every further token: at batch 1 a step is
    mostly kernel launches and Python, which a replay skips. The first two steps run eagerly,
    so that lazily built state (caches of the packed modules, Triton's compiled kernels) exists
    before the capture. ``step_ms``: a list that gets the milliseconds of every decode step after
    the first token (CUDA events on CUDA, the wall clock on CPU): the steady decode speed,
    without the prompt's forward, the eager steps and the capture."""
    import inspect

    import torch
    from transformers import StaticCache

    from .utils.timing import call_ms

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    batch, prompt = input_ids.shape
    dev = input_ids.device
    cuda_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
    if cuda_graph and dev.type != "cuda":
        raise ValueError("cuda_graph=True needs input_ids on a CUDA device")
    cache = StaticCache(config=model.config, max_cache_len=prompt + max_new_tokens)
    # transformers versions differ in whether the cache learns its write position from
    # ``cache_position`` or counts on its own; both get static tensors that the step advances
    takes_cache_position = "cache_position" in inspect.signature(type(model).forward).parameters
    out = torch.empty(batch, prompt + max_new_tokens, dtype=input_ids.dtype, device=dev)
    out[:, :prompt] = input_ids
    pos = torch.arange(prompt, device=dev)
    col = torch.full((1,), prompt, dtype=torch.long, device=dev)     # where the next token goes

    def forward(ids, positions):
        kw = dict(cache_position=positions) if takes_cache_position else {}
        return model(input_ids=ids, position_ids=positions[None].expand(batch, -1), past_key_values=cache,
                     use_cache=True, **kw).logits[:, -1]

    with torch.no_grad():
        tok = forward(input_ids, pos).argmax(-1, keepdim=True)
        out[:, prompt:prompt + 1] = tok
        pos = torch.full((1,), prompt, dtype=torch.long, device=dev)

        def step():
            nxt = forward(tok, pos).argmax(-1, keepdim=True)
            col.add_(1)
            out.index_copy_(1, col, nxt)
            tok.copy_(nxt)
            pos.add_(1)

        def timed(run):
            if step_ms is None:
                run()
            else:
                step_ms.append(call_ms(run, dev))

        left = max_new_tokens - 1
        eager_steps = left if not cuda_graph else min(left, 2)
        for _ in range(eager_steps):
            timed(step)
        left -= eager_steps
        if left:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(left):
                timed(graph.replay)
    return out
