"""utils/switch_experts.py against transformers' expert loop: logits, the capacity cut,
gradients, and weights written into the experts afterwards."""
import copy

import torch

from moeq.utils.switch_experts import batched_switch_experts


def tiny_switch(capacity: int, seed: int = 0):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    torch.manual_seed(seed)
    cfg = SwitchTransformersConfig(vocab_size=97, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=4,
                                   num_decoder_layers=4, num_experts=4, expert_capacity=capacity,
                                   encoder_sparse_step=2, decoder_sparse_step=2, dropout_rate=0.0, router_jitter_noise=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = SwitchTransformersForConditionalGeneration(cfg)
    with torch.no_grad():   # routers of moderate scale: every expert gets tokens
        for name, p in model.named_parameters():
            if name.endswith("router.classifier.weight"):
                p.normal_(0.0, 0.5)
    return model


def pair(model, batched: bool):
    other = copy.deepcopy(model)
    if batched:
        assert batched_switch_experts(other) == 4   # 2 sparse encoder + 2 sparse decoder layers
    return other


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, 97, (3, 24), generator=g)
    mask = torch.ones_like(src)
    mask[1, 17:] = 0
    labels = torch.randint(1, 97, (3, 9), generator=g)
    return src, mask, labels


def test_batched_experts_match_the_loop_with_tokens_over_capacity():
    # capacity 3 of 24 source tokens per sequence and expert: many tokens dropped
    model = tiny_switch(capacity=3)
    src, mask, labels = batch()
    loop, fast = pair(model, False), pair(model, True)
    dropped = []
    loop.encoder.block[1].layer[1].mlp.router.register_forward_hook(
        lambda m, a, out: dropped.append(int((out[0].sum(-1) == 0).sum())))
    out_loop = loop(input_ids=src, attention_mask=mask, labels=labels)
    out_fast = fast(input_ids=src, attention_mask=mask, labels=labels)
    assert dropped[0] > 0
    torch.testing.assert_close(out_fast.logits, out_loop.logits, rtol=1e-5, atol=1e-5)
    out_loop.loss.backward()
    out_fast.loss.backward()
    grads_loop = dict(loop.named_parameters())
    for name, p in fast.named_parameters():
        g = grads_loop[name].grad
        if g is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    # an expert's weights move the output: the gradient reached the stacked expert weights
    assert fast.encoder.block[1].layer[1].mlp.experts["expert_0"].wi.weight.grad.abs().sum() > 0


def test_batched_experts_generate_as_the_loop_and_read_weights_written_later():
    model = tiny_switch(capacity=64).eval()
    src, mask, _ = batch(2)
    loop, fast = pair(model, False), pair(model, True)
    for m in (loop, fast):   # a quantized expert is written into its nn.Linear: both paths must see it
        with torch.no_grad():
            m.decoder.block[1].layer[2].mlp.experts["expert_2"].wo.weight.mul_(-3.0)
    with torch.no_grad():
        g_loop = loop.generate(input_ids=src, attention_mask=mask, max_new_tokens=8, do_sample=False)
        g_fast = fast.generate(input_ids=src, attention_mask=mask, max_new_tokens=8, do_sample=False)
        base = model.generate(input_ids=src, attention_mask=mask, max_new_tokens=8, do_sample=False)
        l_fast = fast(input_ids=src, attention_mask=mask, decoder_input_ids=g_fast).logits
        l_base = model(input_ids=src, attention_mask=mask, decoder_input_ids=g_fast).logits
    assert torch.equal(g_fast, g_loop)
    assert not torch.allclose(l_fast, l_base)   # the written weights are used
    assert base.shape[0] == g_fast.shape[0]


def router_5_17(self, hidden_states):
    """transformers 5.17's Switch router (its outputs: top probability, the dispatch mask
    (..., 1, E) whose capacity cut runs over a length-1 axis, the top probability again)."""
    h = hidden_states.to(self.dtype)
    probs = torch.softmax(self.classifier(h), dim=-1, dtype=self.dtype).to(hidden_states.dtype)
    top, index = torch.max(probs, dim=-1, keepdim=True)
    mask = torch.nn.functional.one_hot(index, num_classes=self.num_experts)
    mask = mask * (torch.cumsum(mask, dim=-2) <= self.expert_capacity)
    return probs.max(-1).values.unsqueeze(-1), mask, top


def test_batched_experts_and_router_taps_with_the_5_17_router():
    import types

    from moeq.testbed.train_switch import router_losses, router_taps
    model = tiny_switch(capacity=2).eval()
    mlp = model.encoder.block[1].layer[1].mlp
    mlp.router.forward = types.MethodType(router_5_17, mlp.router)
    taps = router_taps(model)
    batched_switch_experts(model)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        out = mlp(x)
        # the obviously-correct reference: token by token, its top expert times its probability
        logits = mlp.router.classifier(x)
        probs = logits.softmax(-1)
        ref = torch.stack([mlp.experts[f"expert_{int(e)}"](t) * p.max()
                           for t, e, p in zip(x.reshape(-1, 32), probs.argmax(-1).reshape(-1), probs.reshape(-1, 4))])
    torch.testing.assert_close(out.reshape(-1, 32), ref, rtol=1e-5, atol=1e-6)   # no capacity cut in 5.17
    name = "encoder.block.1.layer.1.mlp.router"
    torch.testing.assert_close(taps[name], logits)   # the taps hold the logits, not the router's outputs
    aux, z = router_losses({name: taps[name]}, torch.ones(2, 10), torch.ones(2, 10))
    f = torch.bincount(probs.argmax(-1).reshape(-1), minlength=4) / 20
    torch.testing.assert_close(aux, 4 * (f * probs.reshape(-1, 4).mean(0)).sum())
    torch.testing.assert_close(z, (torch.logsumexp(logits, -1) ** 2).mean())
