import pytest
import torch

from moeq.quant.gptq import gptq_quantize, gptq_reference, output_error
from moeq.quant.quantizer import rtn


def correlated_hessian(cols, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + torch.randn(n, 1, generator=g)
    return (X.T @ X / n).double()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_batched_matches_slow_reference(bits):
    C = 64
    H = correlated_hessian(C)
    W = torch.randn(3, 24, C, dtype=torch.float64)
    res = gptq_quantize(W, H.expand(3, C, C), [bits] * 3, groupsize=32, blocksize=32)
    for b in range(3):
        ref = gptq_reference(W[b], H, bits, groupsize=32)
        assert torch.equal(res.weight[b], ref)


def test_mixed_bits_in_one_batch_equal_separate_calls():
    C = 64
    H = torch.stack([correlated_hessian(C, seed=s) for s in range(3)])
    W = torch.randn(3, 16, C, dtype=torch.float64)
    res = gptq_quantize(W, H, [3, 1, 2], groupsize=16)
    for b, bits in enumerate([3, 1, 2]):
        alone = gptq_quantize(W[b:b + 1], H[b:b + 1], [bits], groupsize=16)
        assert torch.equal(res.weight[b], alone.weight[0])
        assert torch.equal(res.codes[b], alone.codes[0])


@pytest.mark.parametrize("bits,act_order", [(2, False), (3, False), (4, False), (2, True), (3, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    C = 128
    H = correlated_hessian(C).float()
    W = torch.randn(1, 64, C)
    res = gptq_quantize(W, H[None], [bits], groupsize=64, act_order=act_order)
    rtn_err = output_error(W[0], rtn(W[0], bits, 64)[3], H)
    assert res.loss[0] < 0.8 * rtn_err
    # codes and params reproduce the weights
    gs = torch.arange(C) // 64
    assert torch.allclose(res.scale[0][:, gs] * (res.codes[0].float() - res.zero[0][:, gs]), res.weight[0])


def test_codes_in_range_and_binary_code_values():
    W = torch.randn(1, 8, 32)
    H = torch.eye(32)[None]
    for bits in (1, 2, 3):
        res = gptq_quantize(W, H, [bits], groupsize=32)
        assert int(res.codes.max()) <= 2 ** bits - 1
    res = gptq_quantize(W, H, [1], groupsize=32)
    # identity Hessian: no error feedback, so 1-bit is the plain binary code mu +- alpha per row
    mu = W[0].mean(1, keepdim=True)
    alpha = (W[0] - mu).abs().mean(1, keepdim=True)
    expect = mu + alpha * torch.where(W[0] >= mu, 1.0, -1.0)
    assert torch.allclose(res.weight[0], expect, atol=2e-3 * float(alpha.max()) + 1e-3)


def test_dead_input_columns_keep_their_weights():
    C = 32
    H = correlated_hessian(C).float()
    H[5, :] = 0
    H[:, 5] = 0
    W = torch.randn(1, 8, C)
    res = gptq_quantize(W, H[None], [4], groupsize=-1)
    assert torch.allclose(res.weight[0, :, 5], W[0, :, 5], atol=0.3)
    assert res.weight[0, :, 5].abs().sum() > 0


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.randn(1, 4, 48), torch.eye(48)[None], [2], groupsize=32)


def test_unsupported_bits():
    with pytest.raises(ValueError, match="unsupported bit width"):
        gptq_quantize(torch.randn(1, 4, 32), torch.eye(32)[None], [5], groupsize=32)
