"""Triton kernels for per-token log-probs over a vocabulary (chunk).

Both kernels work on a column slice ``[v0, v0 + V)`` of the full vocabulary, so the same code
serves :func:`dqo_kernels.token_logprobs` (one slice: all of it) and
:func:`dqo_kernels.linear_logprobs` (the lm_head's output computed slice by slice).

Forward, one program per row (as Liger-Kernel's cross-entropy), an online logsumexp over
blocks of ``BV`` columns in fp32, with ``z = x / temperature``::

    m_k = max(m_{k-1}, max_j z_j),   s_k = s_{k-1} exp(m_{k-1} - m_k) + sum_j exp(z_j - m_k)
    lse = m + log s,   z_y = z[target - v0] (0 if the target is outside the slice)
    ez  = sum_j softmax(z)_j z_j   (only with HAS_EZ, for the entropy H = lse - ez)

The target logit is loaded once per row, before the sweep; a row whose target is negative
(``ignore_index``: the launchers map a non-negative one to -1) does no sweep at all (its
outputs are 0: the callers give such rows logp 0, entropy 0 and no gradient, whatever their
lse).

Backward, a 2-D grid over (row, column block), given the *global* ``lse``::

    dlogits_j = (g (1[j = y] - p_j) - gH p_j (z_j - lse + H)) / temperature,   p_j = exp(z_j - lse)

written to ``dlogits``, which may be the logits buffer itself (``inplace_backward``). An
ignored row's gradient is 0: its blocks store zeros without reading the logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device import device_guard
from ..triton_index import offsets64

# Forward block and warps as Liger-Kernel's cross-entropy chooses them (``MAX_FUSED_SIZE =
# 65536 // 2``, ``BLOCK_SIZE = min(MAX_FUSED_SIZE, next_power_of_2(V))``, 32 warps on CUDA):
# one program owns a row, so the row's whole vocabulary sweep must keep a full SM busy; 32k
# fp32 columns over 32 warps (1024 threads) is 32 values a thread, in registers, and a
# 152k vocabulary takes 5 iterations instead of 149 of 1024 columns, each with its own
# max/sum reductions and loop-carried dependency. (2^15 fp32 values = 128 KiB a block in
# flight is what the register file holds; larger blocks spill.)
MAX_FUSED_SIZE = 65536 // 2
FWD_BV = MAX_FUSED_SIZE
FWD_WARPS = 32
# Backward: a 2-D grid (row, column block), so that a few long rows still fill the GPU; each
# program is independent, 1024 columns and 4 warps (8 values a thread).
BWD_BV = 1024
BWD_WARPS = 4


@triton.jit
def logprobs_fwd_kernel(
    logits, targets, lse, tgt_logit, ez, s_n, V, v0, inv_temp,
    HAS_EZ: tl.constexpr, BV: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)  # row offsets i_n * s_n pass 2^31 at N * V >= 2^31
    p_x = logits + i_n * s_n
    b_tgt = tl.load(targets + i_n).to(tl.int64)
    b_zero = tl.sum(tl.zeros([BV], dtype=tl.float32), axis=0)
    if b_tgt < 0:
        # an ignored row: no sweep over the vocabulary
        tl.store(lse + i_n, b_zero)
        tl.store(tgt_logit + i_n, b_zero)
        if HAS_EZ:
            tl.store(ez + i_n, b_zero)
        return
    b_y = b_tgt - v0
    # the target logit, once (0 when the target is outside this slice of the vocabulary)
    m_y = (b_y >= 0) & (b_y < V)
    b_zt = tl.load(p_x + tl.where(m_y, b_y, 0), mask=m_y, other=0).to(tl.float32) * inv_temp
    b_zt = tl.where(m_y, b_zt, 0.0)
    b_m = b_zero - float("inf")
    b_s = b_zero
    b_ez = b_zero
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_z = tl.load(p_x + o_v, mask=m_v, other=-float("inf")).to(tl.float32) * inv_temp
        b_mn = tl.maximum(b_m, tl.max(b_z, axis=0))
        # A block (or row) of -inf logits: keep exp() away from (-inf) - (-inf).
        b_ref = tl.where(b_mn == -float("inf"), 0.0, b_mn)
        b_e = tl.exp(b_z - b_ref)
        b_scale = tl.exp(b_m - b_ref)
        b_s = b_s * b_scale + tl.sum(b_e, axis=0)
        if HAS_EZ:
            b_ez = b_ez * b_scale + tl.sum(b_e * tl.where(b_e > 0, b_z, 0.0), axis=0)
        b_m = b_mn
    b_ref = tl.where(b_m == -float("inf"), 0.0, b_m)
    tl.store(lse + i_n, b_ref + tl.log(b_s))
    tl.store(tgt_logit + i_n, b_zt)
    if HAS_EZ:
        tl.store(ez + i_n, b_ez / b_s)


@triton.jit
def logprobs_bwd_kernel(
    logits, dlogits, targets, lse, grad, grad_ent, entropy, s_n, s_dn, V, v0, inv_temp,
    HAS_ENT: tl.constexpr, BV: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_d = dlogits + offsets64(i_n, s_dn, o_v, 1)
    b_tgt = tl.load(targets + i_n).to(tl.int64)
    if b_tgt < 0:
        # an ignored row: its gradient is 0, the logits need not be read
        tl.store(p_d, tl.zeros([BV], dtype=tl.float32).to(dlogits.dtype.element_ty), mask=m_v)
        return
    b_z = tl.load(logits + offsets64(i_n, s_n, o_v, 1), mask=m_v, other=-float("inf"))
    b_z = b_z.to(tl.float32) * inv_temp
    b_y = b_tgt - v0
    b_lse = tl.load(lse + i_n)
    b_g = tl.load(grad + i_n)
    b_p = tl.exp(b_z - b_lse)
    b_d = b_g * (tl.where(o_v == b_y, 1.0, 0.0) - b_p)
    if HAS_ENT:
        b_gh = tl.load(grad_ent + i_n)
        b_h = tl.load(entropy + i_n)
        b_d -= b_gh * b_p * tl.where(b_p > 0, b_z - b_lse + b_h, 0.0)
    tl.store(p_d, (b_d * inv_temp).to(dlogits.dtype.element_ty), mask=m_v)


def _ignored_negative(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The targets as the kernels read them: an ignored row is one with a negative target.
    A negative ``ignore_index`` (-100) already is one (any other negative id is refused by
    the data checks); a non-negative one is mapped to -1 ([N] ints, one small op)."""
    if ignore_index < 0:
        return targets
    return torch.where(targets == ignore_index, -1, targets)


def fwd_config(V: int, device: torch.device):
    """(block of columns, warps) of the forward kernel: Liger-Kernel's choice (see
    ``MAX_FUSED_SIZE``); 16 warps off CUDA, as Liger (the interpreter ignores them)."""
    return min(FWD_BV, triton.next_power_of_2(V)), FWD_WARPS if device.type == "cuda" else 16


@device_guard
def lse_forward(logits: torch.Tensor, targets: torch.Tensor, v0: int, inv_temp: float,
                want_ez: bool, ignore_index: int = -100):
    """(lse, target logit, E_softmax[z] or None), each [N] fp32, for a slice of columns.
    ``logits`` is [N, V] (made unit column stride if it is not); ``targets`` are global
    vocabulary ids. Rows whose target is ``ignore_index`` get 0 for all three."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets = targets.contiguous()
    N, V = logits.shape
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    zt = torch.empty_like(lse)
    ez = torch.empty_like(lse) if want_ez else lse
    if N:
        BV, warps = fwd_config(V, logits.device)
        logprobs_fwd_kernel[(N,)](
            logits, _ignored_negative(targets, ignore_index), lse, zt, ez, logits.stride(0), V,
            v0, inv_temp, HAS_EZ=want_ez, BV=BV, num_warps=warps)
    return lse, zt, (ez if want_ez else None)


@device_guard
def logits_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                grad: torch.Tensor, v0: int, inv_temp: float, out: torch.Tensor,
                grad_ent=None, entropy=None, ignore_index: int = -100) -> torch.Tensor:
    """Write d(sum g logp + gH H)/dlogits of a column slice into ``out`` (may be ``logits``);
    rows whose target is ``ignore_index`` get 0."""
    if out.stride(-1) != 1:
        raise ValueError("logits_grad: out must have unit column stride")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets, lse, grad = targets.contiguous(), lse.contiguous(), grad.contiguous()
    N, V = logits.shape
    BV = min(BWD_BV, triton.next_power_of_2(V))
    has_ent = grad_ent is not None
    if has_ent:
        grad_ent, entropy = grad_ent.contiguous(), entropy.contiguous()
    if N:
        logprobs_bwd_kernel[(N, triton.cdiv(V, BV))](
            logits, out, _ignored_negative(targets, ignore_index), lse, grad,
            grad_ent if has_ent else grad, entropy if has_ent else grad, logits.stride(0),
            out.stride(0), V, v0, inv_temp, HAS_ENT=has_ent, BV=BV, num_warps=BWD_WARPS)
    return out
