"""GPTQ (Frantar et al., 2022), batched over matrices of one shape.

Quantizes B weight matrices W[b] (R x C) at once, each with its own Hessian
H[b] = X_b^T X_b / n_b (C x C) and its own bit width, column by column:

    q_i   = quant(w_i)                       (group params fixed at the group's first column)
    e_i   = (w_i - q_i) / [H^-1]_ii           (H^-1 via the upper Cholesky factor, as in GPTQ)
    w_j  -= e_i [H^-1]_ij   for j > i         (lazily, one block of columns at a time)

Batching the experts of one MoE layer turns B small column loops into one, which
is what makes per-expert GPTQ fast on a GPU. ``gptq_reference`` below is the slow,
one-matrix, one-column-at-a-time version the batched one is tested against.

act_order quantizes columns in order of decreasing H_ii; its group parameters are
then computed from the original weights before any update ("static groups"), so
the checkpoint needs no column permutation.

Group parameters come from quant.quantizer.group_params (``grid``): the "search" grid
weighs each column's error by 1 / [U]_jj^2, U the upper Cholesky factor of H^-1, that
is by what GPTQ's own loss  sum_j (w_j - q_j)^2 / U_jj^2  charges for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import binary_group_params, check_bits, check_grid, dequantize, group_params, quantize_codes, rtn


@dataclass
class GPTQResult:
    codes: torch.Tensor      # (B, R, C) uint8 integer codes
    scale: torch.Tensor      # (B, R, G) float32 (values exactly representable in fp16)
    zero: torch.Tensor       # (B, R, G) float32
    weight: torch.Tensor     # (B, R, C) float32 dequantized weights
    loss: torch.Tensor       # (B,) relative output error tr(dW H dW^T) / tr(W H W^T)


def output_error(weight: torch.Tensor, weight_hat: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Relative error of the layer output on the calibration inputs, per matrix
    (a reported figure only: TF32 on the GPU is accurate enough for it)."""
    dw = weight - weight_hat
    with _tf32(True):
        num = ((dw @ hessian) * dw).sum(dim=(-1, -2))
        den = ((weight @ hessian) * weight).sum(dim=(-1, -2)).clamp(min=1e-30)
    return num / den


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Weights (..., R, C) from codes (..., R, C) and each group's scale and zero (..., R, G),
    as GPTQ dequantizes its result (so whoever gets the codes makes the very same weights)."""
    C, G = codes.shape[-1], scale.shape[-1]
    col_group = torch.arange(C, device=codes.device) // (C // G)
    return dequantize(codes.to(scale.dtype), scale[..., col_group], zero[..., col_group])


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1), raising damp for
    matrices that are not PD. With J the reversal permutation and L = chol(J H J),
    U = J L^-1 J: one Cholesky and one triangular inverse instead of three factorizations."""
    n = hessian.shape[-1]
    eye = torch.eye(n, device=hessian.device, dtype=hessian.dtype)
    mean_diag = torch.diagonal(hessian, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-8)
    damp = percdamp * mean_diag
    flipped = hessian.flip(-1, -2)
    for _ in range(20):
        chol, info = torch.linalg.cholesky_ex(flipped + damp[:, None, None] * eye)
        bad = info != 0
        if not bool(bad.any()):
            break
        damp = torch.where(bad, damp * 10, damp)
    else:
        raise RuntimeError("GPTQ: Hessian is not positive definite even with heavy dampening")
    del flipped, eye
    linv = lower_inverse(chol)
    del chol
    return linv.flip(-1, -2)


TRIANGULAR_BASE = 512   # below this, a triangular solve against the identity


def lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """L^-1 of lower-triangular L (..., n, n), blocked: with L = [[A, 0], [B, C]],
    L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. Two matrix products per level, so n^3/3
    multiply-adds on the GPU's GEMMs, where a triangular solve against the identity does n^3
    (the identity's zeros included): DeepSeek-V3's 7168-wide Hessians, 256 per layer."""
    n = L.shape[-1]
    if n <= TRIANGULAR_BASE:
        eye = torch.eye(n, device=L.device, dtype=L.dtype)
        return torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    h = n // 2
    out = torch.zeros_like(L)
    out[..., :h, :h] = a_inv = lower_inverse(L[..., :h, :h])
    out[..., h:, h:] = c_inv = lower_inverse(L[..., h:, h:])
    with _tf32(False):   # full float32 products: GPTQ's updates come from these
        out[..., h:, :h] = -(c_inv @ (L[..., h:, :h] @ a_inv))
    return out


def _prepare(weight, hessian, bits):
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # float64 for tests
    W = weight.to(dtype).clone()
    H = hessian.to(dtype).clone()
    # Inputs that were always zero in calibration: keep H invertible; the weight is
    # kept and rounded (not zeroed), since other inputs may well use it.
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    idx = dead.nonzero(as_tuple=True)
    H[idx[0], idx[1], idx[1]] = 1.0
    bits_t = torch.tensor([check_bits(b) for b in bits], device=W.device)
    maxq = (2.0 ** bits_t.to(dtype) - 1).view(-1, 1)
    return W, H, bits_t, maxq


def _parts(bits_t: torch.Tensor) -> list:
    """The batch split by kind of grid: [(rows, binary)], rows a LongTensor of matrices or
    slice(None) for all of them. Made on the host, outside any CUDA graph capture."""
    widths = bits_t.tolist()
    binary = [b for b, k in enumerate(widths) if k == 1]
    if len(binary) in (0, len(widths)):
        return [(slice(None), bool(binary))]
    other = [b for b, k in enumerate(widths) if k != 1]
    return [(torch.tensor(rows, device=bits_t.device), kind) for rows, kind in ((other, False), (binary, True))]


def _batch_params(w, colw, bits_t, parts, sym, grid):
    """group_params of a batch, each part on its own grid only: in a batch at 3/2/1 bits the
    1-bit code is searched on the 1-bit matrices alone and the affine grid on the others."""
    scale, zero = torch.empty_like(w[..., :1]), torch.empty_like(w[..., :1])
    for rows, binary in parts:
        wr, cr = w[rows], colw[rows]
        s, z = binary_group_params(wr, grid, cr) if binary else group_params(wr, bits_t[rows], sym, False, grid, cr)
        scale[rows], zero[rows] = s, z
    return scale, zero


class _BlockRunner:
    """The column loop over one block of columns (no act_order), on static buffers.
    On CUDA the loop (hundreds of small kernels) is captured once as a CUDA graph and
    replayed for every later block of the same width: launch overhead, not arithmetic,
    dominates it otherwise."""

    def __init__(self, B, R, bs, gs, bits_t, maxq, sym, grid, device, dtype, graphs: bool, fused: bool = False):
        self.bs, self.gs, self.bits_t, self.sym, self.grid = bs, gs, bits_t, sym, grid
        # Columns of a group must see every update before its params are taken, so a
        # sub-block never spans a group start except at its own first column.
        self.sub = 32 if gs % 32 == 0 else gs
        self.maxq = maxq[:, :, None]
        self.parts = _parts(bits_t)
        self.W1 = torch.empty(B, R, bs, device=device, dtype=dtype)
        self.H1 = torch.empty(B, bs, bs, device=device, dtype=dtype)
        self.Q1, self.E1 = torch.empty_like(self.W1), torch.empty_like(self.W1)
        self.S1 = torch.empty(B, R, bs // gs, device=device, dtype=dtype)
        self.Z1 = torch.empty_like(self.S1)
        self.graphs, self.graph = graphs, None
        self.fused = fused   # the column loop as one Triton kernel per sub-block (quant/triton_gptq.py)
        self.maxq_flat = maxq.reshape(-1).contiguous()

    def _step(self):
        W1, H1 = self.W1, self.H1
        colw = 1 / torch.diagonal(H1, dim1=-2, dim2=-1)[:, None, :].square()  # GPTQ's cost per column
        for j0 in range(0, self.bs, self.sub):
            j1 = min(j0 + self.sub, self.bs)
            g = j0 // self.gs   # a sub-block lies in one group, and groups start at sub-block starts
            if j0 % self.gs == 0:  # the group's columns are all updated up to here
                s_new, z_new = _batch_params(W1[:, :, j0:j0 + self.gs], colw[:, :, j0:j0 + self.gs], self.bits_t,
                                             self.parts, self.sym, self.grid)
                self.S1[:, :, g] = s_new[..., 0]
                self.Z1[:, :, g] = z_new[..., 0]
            if self.fused:
                from .triton_gptq import quantize_columns
                quantize_columns(W1, H1, self.S1, self.Z1, self.maxq_flat, self.Q1, self.E1, j0, j1, g)
            else:
                self._columns(j0, j1, g)
            if j1 < self.bs:  # lazy update of the rest of the block, one GEMM per sub-block
                W1[:, :, j1:] -= self.E1[:, :, j0:j1] @ H1[:, j0:j1, j1:]

    def _columns(self, j0, j1, g):
        """The eager column loop of one sub-block (the CPU path, and the fused kernel's reference)."""
        W1, H1, B = self.W1, self.H1, self.W1.shape[0]
        s, z = self.S1[:, :, g, None], self.Z1[:, :, g, None]
        for i in range(j0, j1):
            w = W1[:, :, i:i + 1]
            q = quantize_codes(w, s, z, self.maxq)
            self.Q1[:, :, i:i + 1] = q
            err = (w - dequantize(q, s, z)) / H1[:, i, i].view(B, 1, 1)
            W1[:, :, i:j1] -= err * H1[:, i:i + 1, i:j1]
            self.E1[:, :, i:i + 1] = err

    def __call__(self, w_block, hinv_block):
        self.W1.copy_(w_block)
        self.H1.copy_(hinv_block)
        if self.graph is not None:
            self.graph.replay()
        elif self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step()  # the real work for this block, and the warm-up for capture
            torch.cuda.current_stream().wait_stream(stream)
            saved = [t.clone() for t in (self.Q1, self.E1, self.S1, self.Z1)]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
            for t, v in zip((self.Q1, self.E1, self.S1, self.Z1), saved):
                t.copy_(v)
        else:
            self._step()
        return self.Q1, self.E1, self.S1, self.Z1


USE_CUDA_GRAPHS = True


def _triton_columns() -> bool:
    from . import triton_gptq
    return triton_gptq.available()


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: list[int], groupsize: int = 128,
                  sym: bool = False, percdamp: float = 0.01, act_order: bool = False,
                  blocksize: int = 128, grid: str = "search") -> GPTQResult:
    """weight (B, R, C), hessian (B, C, C) -> GPTQResult. bits: one width per matrix.
    grid: "search" | "minmax" (see quant/quantizer.py)."""
    B, R, C = weight.shape
    check_grid(grid)
    gs = C if groupsize <= 0 else groupsize
    if C % gs:
        raise ValueError(f"group size {gs} does not divide the {C} input columns")
    W, H, bits_t, maxq = _prepare(weight, hessian, bits)
    G = C // gs
    scale = torch.zeros(B, R, G, device=W.device, dtype=W.dtype)
    zero = torch.zeros(B, R, G, device=W.device, dtype=W.dtype)
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)  # (B, C)
        H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand(B, C, C)), 2, perm[:, None, :].expand(B, C, C))
        Hinv = _inverse_cholesky(H, percdamp)
        del H
        # GPTQ's cost of each column where act_order puts it, back in the original order
        cost = 1 / torch.diagonal(Hinv, dim1=-2, dim2=-1).square()
        colw = torch.empty_like(cost).scatter_(1, perm, cost)[:, None, :]
        parts = _parts(bits_t)
        for g in range(G):
            cols = slice(g * gs, (g + 1) * gs)
            s, z = _batch_params(W[:, :, cols], colw[:, :, cols], bits_t, parts, sym, grid)
            scale[:, :, g], zero[:, :, g] = s[..., 0], z[..., 0]
        W = torch.gather(W, 2, perm[:, None, :].expand(B, R, C))
        Q = _act_order_loop(W, Hinv, scale, zero, torch.div(perm, gs, rounding_mode="floor"), maxq, blocksize)
        Q = torch.gather(Q, 2, torch.argsort(perm, dim=-1)[:, None, :].expand(B, R, C))
    else:
        Hinv = _inverse_cholesky(H, percdamp)
        del H
        # Blocks hold whole groups, so a group's params come from fully updated weights.
        bs = max(blocksize // gs, 1) * gs
        Q = torch.empty_like(W)
        fused = W.is_cuda and W.dtype == torch.float32 and _triton_columns()
        runner = _BlockRunner(B, R, bs, gs, bits_t, maxq, sym, grid, W.device, W.dtype,
                              graphs=W.is_cuda and USE_CUDA_GRAPHS, fused=fused)
        for i1 in range(0, C, bs):
            i2 = min(i1 + bs, C)
            if i2 - i1 != bs:  # a last, narrower block: its own (eager) runner
                runner = _BlockRunner(B, R, i2 - i1, gs, bits_t, maxq, sym, grid, W.device, W.dtype,
                                      graphs=False, fused=fused)
            q1, e1, s1, z1 = runner(W[:, :, i1:i2], Hinv[:, i1:i2, i1:i2])
            Q[:, :, i1:i2] = q1
            scale[:, :, i1 // gs:i2 // gs] = s1
            zero[:, :, i1 // gs:i2 // gs] = z1
            W[:, :, i2:] -= e1 @ Hinv[:, i1:i2, i2:]
    del W, Hinv
    deq = dequantize_groups(Q, scale, zero)
    return GPTQResult(Q.to(torch.uint8), scale, zero, deq, output_error(weight.to(deq.dtype), deq, hessian.to(deq.dtype)))


def rtn_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: list[int], groupsize: int = 128,
                 sym: bool = False, percdamp: float = 0.0, act_order: bool = False,
                 grid: str = "search") -> GPTQResult:
    """Round-to-nearest, the baseline GPTQ is compared with: same grid, no error
    feedback (``percdamp`` and ``act_order`` do not apply). The Hessian only measures
    the resulting output error."""
    parts = [rtn(w, b, groupsize, sym, grid) for w, b in zip(weight.float(), bits)]
    codes, scale, zero, deq = (torch.stack(t) for t in zip(*parts))
    return GPTQResult(codes, scale, zero, deq, output_error(weight.float(), deq, hessian.float()))


QUANTIZERS = {"gptq": gptq_quantize, "rtn": rtn_quantize}


def _tf32(enabled: bool):
    class _Ctx:
        def __enter__(self):
            self.prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = enabled

        def __exit__(self, *exc):
            torch.backends.cuda.matmul.allow_tf32 = self.prev
    return _Ctx()


def _act_order_loop(W, Hinv, scale, zero, group_of_col, maxq, bs):
    """Columns in the (per-matrix) act-order permutation; group params fixed beforehand."""
    B, R, C = W.shape
    Q = torch.zeros_like(W)
    ar = torch.arange(B, device=W.device)
    for i1 in range(0, C, bs):
        i2 = min(i1 + bs, C)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of_col[:, i1 + i]
            s, z = scale[ar, :, g][:, :, None], zero[ar, :, g][:, :, None]
            w = W1[:, :, i:i + 1]
            q = quantize_codes(w, s, z, maxq[:, :, None])
            Q[:, :, i1 + i:i1 + i + 1] = q
            err = (w - dequantize(q, s, z)) / Hinv1[:, i, i].view(B, 1, 1)
            W1[:, :, i:] -= err * Hinv1[:, i:i + 1, i:]
            Err1[:, :, i:i + 1] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    return Q


@torch.no_grad()
def gptq_reference(weight: torch.Tensor, hessian: torch.Tensor, bits: int, groupsize: int = 128,
                   sym: bool = False, percdamp: float = 0.01, grid: str = "search") -> torch.Tensor:
    """Slow, obviously-correct GPTQ of one (R, C) matrix: no blocks, no batching,
    every column's error propagated into all later columns immediately. Returns the
    dequantized weights. (No act_order: that is the same algorithm on permuted columns.)"""
    W, H, bits_t, maxq = _prepare(weight[None], hessian[None], [bits])
    W, H, maxq = W[0].double(), H[0].double(), maxq.double()
    R, C = W.shape
    gs = C if groupsize <= 0 else groupsize
    damp = percdamp * torch.diagonal(H).mean()
    Hinv = torch.linalg.inv(H + damp * torch.eye(C, dtype=H.dtype, device=H.device))
    out = torch.zeros_like(W)
    for i in range(C):
        if i % gs == 0:
            # Column j's loss will be err_j^2 / (H^-1 conditioned on the columns before j)_jj,
            # the squared diagonal of the Cholesky factor of the group's block of H^-1 now.
            d = torch.diagonal(torch.linalg.cholesky(Hinv[i:i + gs, i:i + gs], upper=True))
            s, z = group_params(W[None, :, i:i + gs], bits_t, sym, grid=grid, colw=1 / d[None, None].square())
            s, z = s[0, :, 0], z[0, :, 0]
        q = quantize_codes(W[:, i], s, z, maxq[0, 0])
        out[:, i] = dequantize(q, s, z)
        err = (W[:, i] - out[:, i]) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        # Condition the remaining inverse Hessian on column i being fixed (Gaussian elimination).
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return out
