import pytest
import torch

from moeq.quant.gptq import gptq_quantize, gptq_reference, output_error, rtn_quantize
from moeq.quant.format import decode_zero, linear_tensors
from moeq.quant.packing import dequantize_packed
from moeq.quant.quantizer import group_error, group_params, rtn


def correlated_hessian(cols, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + torch.randn(n, 1, generator=g)
    return (X.T @ X / n).double()


@pytest.mark.parametrize("grid", ["search", "minmax"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_batched_matches_slow_reference(bits, grid):
    C = 64
    H = correlated_hessian(C)
    W = torch.randn(3, 24, C, dtype=torch.float64)
    res = gptq_quantize(W, H.expand(3, C, C), [bits] * 3, groupsize=32, blocksize=32, grid=grid)
    for b in range(3):
        ref = gptq_reference(W[b], H, bits, groupsize=32, grid=grid)
        assert torch.equal(res.weight[b], ref)


@pytest.mark.parametrize("bits", [2, 3])
def test_batched_matches_slow_reference_symmetric(bits):
    C = 64
    H = correlated_hessian(C, seed=1)
    W = torch.randn(2, 16, C, dtype=torch.float64)
    res = gptq_quantize(W, H.expand(2, C, C), [bits] * 2, groupsize=32, sym=True)
    for b in range(2):
        assert torch.equal(res.weight[b], gptq_reference(W[b], H, bits, groupsize=32, sym=True))
    assert (res.zero == 2 ** (bits - 1)).all()


def heavy_tailed_groups(B, R, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(B, R, G, generator=g) * torch.exp(torch.randn(B, R, 1, generator=g))
    n = (B, (R + 2) // 3, G)  # a third of the rows Student-t (2 dof): heavy tails
    w[:, ::3] = torch.randn(n, generator=g) / torch.sqrt(-torch.log(torch.rand(n, generator=g)))
    w[:, 1, :] = 0.0  # an all-zero group
    w[:, 2, :] = 0.25  # a constant group
    colw = torch.exp(2 * torch.randn(B, 1, G, generator=g))  # columns of very different cost
    return w, colw


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_searched_grid_never_worse_than_minmax_per_group(sym, weighted):
    """Min-max is one of the search's candidates, so on every group its (weighted) error is <= min-max's."""
    w, colw = heavy_tailed_groups(5, 300, 128)
    colw = colw if weighted else None
    bits = torch.tensor([1, 2, 3, 4, 8])
    maxq = (2.0 ** bits - 1).view(-1, 1, 1)
    s0, z0 = group_params(w, bits, sym, grid="minmax")
    s1, z1 = group_params(w, bits, sym, grid="search", colw=colw)
    e0, e1 = group_error(w, s0, z0, maxq, colw), group_error(w, s1, z1, maxq, colw)
    assert (e1 <= e0).all()
    assert (e1 < e0).float().mean() > 0.5  # and it does find better grids
    # stored as the checkpoint stores them: fp16 scales, integer zeros in range for bits >= 2
    assert torch.equal(s1, s1.half().float()) and (s1 > 0).all()
    zi = z1[1:]
    assert torch.equal(zi, zi.round()) and (zi >= 0).all() and (zi <= maxq[1:]).all()
    assert torch.equal(z1[:1], z1[:1].half().float())
    codes = torch.clamp(torch.round(w / s1 + z1), torch.zeros_like(maxq), maxq)
    assert codes.min() >= 0 and (codes <= maxq).all()


def test_rtn_uses_the_same_grid():
    w, _ = heavy_tailed_groups(1, 40, 256, seed=3)
    w = w[0]
    for bits in (1, 2, 3, 4):
        codes, scale, zero, deq = rtn(w, bits, 64)
        s, z = group_params(w.reshape(1, -1, 64), torch.tensor([bits]), False)
        assert torch.equal(scale, s.reshape(40, 4)) and torch.equal(zero, z.reshape(40, 4))
        _, s0, z0, deq0 = rtn(w, bits, 64, grid="minmax")
        maxq = torch.tensor(2.0 ** bits - 1)
        groups = w.reshape(40, 4, 64)
        assert (group_error(groups, scale[..., None], zero[..., None], maxq)
                <= group_error(groups, s0[..., None], z0[..., None], maxq)).all()
        assert ((deq - w) ** 2).sum() < ((deq0 - w) ** 2).sum()
        res = rtn_quantize(w[None], torch.eye(256)[None], [bits], 64)
        assert torch.equal(res.weight[0], deq) and torch.equal(res.codes[0], codes)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_packed_equals_fake_quant_bit_for_bit(method):
    C = 256
    H = correlated_hessian(C, seed=2).float()
    W = heavy_tailed_groups(4, 24, C, seed=4)[0] * 0.02
    bits = [1, 2, 3, 4]
    quantize = gptq_quantize if method == "gptq" else rtn_quantize
    res = quantize(W, H.expand(4, C, C), bits, 64)
    for b, nbits in enumerate(bits):   # through the checkpoint's tensors (quant/format.py)
        t = linear_tensors(res.codes[b], res.scale[b], res.zero[b], nbits)
        zero = decode_zero(t["weight_zero"], nbits, C // 64)
        deq = dequantize_packed(t["weight"].view(torch.uint8), t["weight_scale"], zero, nbits, C)
        assert torch.equal(deq, res.weight[b]), nbits


def test_search_lowers_gptq_error_on_outlier_inputs():
    C = 256
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, C, generator=g)
    X[:, ::64] *= 8  # a few outlier input channels
    H = X.T @ X / 1024
    W = torch.randn(2, 64, C, generator=g)
    new = gptq_quantize(W, H.expand(2, C, C), [2, 4], 128)
    old = gptq_quantize(W, H.expand(2, C, C), [2, 4], 128, grid="minmax")
    assert (new.loss < 0.9 * old.loss).all()


def test_unknown_grid():
    with pytest.raises(ValueError, match="unknown grid"):
        gptq_quantize(torch.randn(1, 4, 32), torch.eye(32)[None], [2], groupsize=32, grid="mse")


@pytest.mark.parametrize("act_order", [False, True])
def test_mixed_bits_in_one_batch_equal_separate_calls(act_order):
    C = 64
    H = torch.stack([correlated_hessian(C, seed=s) for s in range(3)])
    W = torch.randn(3, 16, C, dtype=torch.float64)
    res = gptq_quantize(W, H, [3, 1, 2], groupsize=16, act_order=act_order)
    for b, bits in enumerate([3, 1, 2]):
        alone = gptq_quantize(W[b:b + 1], H[b:b + 1], [bits], groupsize=16, act_order=act_order)
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
    W = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    H = torch.eye(32)[None]
    for bits in (1, 2, 3):
        res = gptq_quantize(W, H, [bits], groupsize=32)
        assert int(res.codes.max()) <= 2 ** bits - 1
    res = gptq_quantize(W, H, [1], groupsize=32, grid="minmax")
    # identity Hessian: no error feedback, so 1-bit is the plain binary code mu +- alpha per row
    mu = W[0].mean(1, keepdim=True)
    alpha = (W[0] - mu).abs().mean(1, keepdim=True)
    expect = mu + alpha * torch.where(W[0] >= mu, 1.0, -1.0)
    assert torch.allclose(res.weight[0], expect, atol=2e-3 * float(alpha.max()) + 1e-3)
    # the searched binary code (2-means) is still two values per row, and closer to W
    res = gptq_quantize(W, H, [1], groupsize=32)
    assert all(len(row.unique()) <= 2 for row in res.weight[0])
    assert ((res.weight[0] - W[0]) ** 2).sum() < ((expect - W[0]) ** 2).sum()


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


@pytest.mark.parametrize("n", [5, 37, 64])
def test_blocked_lower_inverse_equals_float64_solve(n, monkeypatch):
    """The blocked triangular inverse (recursing down to blocks of 4 here, odd splits included)
    against a float64 triangular solve."""
    from moeq.quant import gptq
    monkeypatch.setattr(gptq, "TRIANGULAR_BASE", 4)
    x = torch.randn(2, 3 * n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    L = torch.linalg.cholesky(x.mT @ x / (3 * n) + 0.01 * torch.eye(n, dtype=torch.float64))
    ref = torch.linalg.solve_triangular(L, torch.eye(n, dtype=torch.float64).expand_as(L), upper=False)
    got = gptq.lower_inverse(L.float()).double()
    assert torch.equal(torch.triu(got, 1), torch.zeros_like(got))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
