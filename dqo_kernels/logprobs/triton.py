"""Triton kernels for per-token log-probs over a vocabulary (chunk).

Both kernels work on a column slice ``[v0, v0 + V)`` of the full vocabulary, so the same code
serves :func:`dqo_kernels.token_logprobs` (one slice: all of it) and
:func:`dqo_kernels.linear_logprobs` (the lm_head's output computed slice by slice).

Forward, one program per row, an online logsumexp over blocks of ``BV`` columns in fp32, with
``z = x / temperature``::

    m_k = max(m_{k-1}, max_j z_j),   s_k = s_{k-1} exp(m_{k-1} - m_k) + sum_j exp(z_j - m_k)
    lse = m + log s,   z_y = z[target - v0] (0 if the target is outside the slice)
    ez  = sum_j softmax(z)_j z_j   (only with HAS_EZ, for the entropy H = lse - ez)

Backward, a 2-D grid over (row, column block), given the *global* ``lse``::

    dlogits_j = (g (1[j = y] - p_j) - gH p_j (z_j - lse + H)) / temperature,   p_j = exp(z_j - lse)

written to ``dlogits``, which may be the logits buffer itself (``inplace_backward``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FWD_BV = 1024
BWD_BV = 1024


@triton.jit
def logprobs_fwd_kernel(
    logits, targets, lse, tgt_logit, ez, s_n, V, v0, inv_temp,
    HAS_EZ: tl.constexpr, BV: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    p_x = logits + i_n * s_n
    b_y = tl.load(targets + i_n).to(tl.int64) - v0
    b_zero = tl.sum(tl.zeros([BV], dtype=tl.float32), axis=0)
    b_m = b_zero - float("inf")
    b_s = b_zero
    b_ez = b_zero
    b_zt = b_zero
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
        b_zt += tl.sum(tl.where(o_v == b_y, b_z, 0.0), axis=0)
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
    b_z = tl.load(logits + i_n * s_n + o_v, mask=m_v, other=-float("inf")).to(tl.float32)
    b_z = b_z * inv_temp
    b_y = tl.load(targets + i_n).to(tl.int64) - v0
    b_lse = tl.load(lse + i_n)
    b_g = tl.load(grad + i_n)
    b_p = tl.exp(b_z - b_lse)
    b_d = b_g * (tl.where(o_v == b_y, 1.0, 0.0) - b_p)
    if HAS_ENT:
        b_gh = tl.load(grad_ent + i_n)
        b_h = tl.load(entropy + i_n)
        b_d -= b_gh * b_p * tl.where(b_p > 0, b_z - b_lse + b_h, 0.0)
    tl.store(dlogits + i_n * s_dn + o_v, (b_d * inv_temp).to(dlogits.dtype.element_ty),
             mask=m_v)


def lse_forward(logits: torch.Tensor, targets: torch.Tensor, v0: int, inv_temp: float,
                want_ez: bool):
    """(lse, target logit, E_softmax[z] or None), each [N] fp32, for a slice of columns.
    ``logits`` is [N, V] with unit column stride; ``targets`` are global vocabulary ids."""
    N, V = logits.shape
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    zt = torch.empty_like(lse)
    ez = torch.empty_like(lse) if want_ez else lse
    if N:
        logprobs_fwd_kernel[(N,)](
            logits, targets, lse, zt, ez, logits.stride(0), V, v0, inv_temp,
            HAS_EZ=want_ez, BV=min(FWD_BV, triton.next_power_of_2(V)), num_warps=4)
    return lse, zt, (ez if want_ez else None)


def logits_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                grad: torch.Tensor, v0: int, inv_temp: float, out: torch.Tensor,
                grad_ent=None, entropy=None) -> torch.Tensor:
    """Write d(sum g logp + gH H)/dlogits of a column slice into ``out`` (may be ``logits``)."""
    N, V = logits.shape
    BV = min(BWD_BV, triton.next_power_of_2(V))
    has_ent = grad_ent is not None
    if N:
        logprobs_bwd_kernel[(N, triton.cdiv(V, BV))](
            logits, out, targets, lse, grad, grad_ent if has_ent else grad,
            entropy if has_ent else grad, logits.stride(0), out.stride(0), V, v0, inv_temp,
            HAS_ENT=has_ent, BV=BV, num_warps=4)
    return out
