"""Triton kernel of the fused DQO loss: lambda-returns, importance weights, losses, gradients.

One program owns one row and walks it in blocks of ``BT`` tokens, twice:

**Pass A (backward in time).** Blocks are visited from the end of the row and loaded in reversed
order, so the backward recurrence becomes a *forward* ``tl.associative_scan`` (compiled Triton
has had wrong results for ``reverse=True`` scans with order-dependent combines). With
``H_t = (1 - lam) * V_t + lam * G_t`` on action positions (carried unchanged over masked ones,
``H = bootstrap`` after the last action)::

    G_t = rt_t + gamma * H_next(t)
    H_t = gamma * lam * H_next(t) + (1 - lam) * V_t + lam * rt_t,    rt_t = r_t - beta * l_t

so each position is the affine map ``(G, H) -> (a G + b H + c, d H + e)`` with
``(a, b, c, d, e) = (0, gamma, rt, gamma*lam, (1-lam) V + lam rt)`` on actions and the identity
``(1, 0, 0, 1, 0)`` elsewhere. A scan of map compositions applied to the carry ``H`` of the
block after this one gives ``G_t`` directly; no division by ``lam`` or ``gamma``, so
``lam = 0`` and ``gamma * lam`` underflow are exact. ``delta_t = V_t - G_t`` (docs/math.md §3.5).

**Pass B (forward in time).** ``c_t`` = cumsum of ``logp - behavior_logp`` over actions, carried
across blocks; ``w_t = exp(min(c_t, log C))``; the per-row losses, ``dL/dvalues = a w_V delta``
and ``dL/dlogp = beta * E_t`` with ``E_t = a w_pi delta_t`` or, with ``TARGET_GRAD``, the
discounted forward scan ``E_t = a w_pi delta_t + gamma * lam * E_prev(t)`` (docs/math.md §3.8).

Everything is computed in fp32 (fp64 for fp64 inputs) right after the loads, so bf16/fp16
inputs are read as they are, with no copies. Loads are masked by the row's bounds only (every
value is used through ``tl.where`` on the action mask), offsets are int64, and each row
writes a data-check flag from the values it loaded (:func:`_check_params`), which the CUDA
path reads lazily instead of running the checks as separate launches.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..device import device_guard
from ..dtypes import acc_dtype
from ..triton_index import offsets64
from ..validation import MIN_LOGPROB_TOLERANCE, DeferredChecks, log_weight_limit
from .aggregation import RowScale
from .importance import log_clip
from .launch import DQOHyper, LaunchOutput


@triton.jit
def _compose_lambda(a1, b1, c1, d1, e1, a2, b2, c2, d2, e2):
    # (map 2) o (map 1) for maps (G, H) -> (a G + b H + c, d H + e); map 1 is applied first.
    return a2 * a1, a2 * b1 + b2 * d1, a2 * c1 + b2 * e1 + c2, d2 * d1, d2 * e1 + e2


@triton.jit
def _compose_affine(p1, q1, p2, q2):
    # (x -> p2 x + q2) o (x -> p1 x + q1)
    return p2 * p1, p2 * q1 + q2


@triton.jit
def dqo_loss_fwd_kernel(
    logp, ref_logp, behavior_logp, values, rewards, mask, bootstrap, row_scale,
    returns, weights, td_error, dlogp, dvalues, policy_rows, value_rows, check_params, flags,
    s_lp_b, s_lp_t, s_ref_b, s_ref_t, s_beh_b, s_beh_t, s_v_b, s_v_t, s_r_b, s_r_t,
    s_m_b, s_m_t,
    T, beta, gamma, lam, log_cap,
    HAS_BEHAVIOR: tl.constexpr, HAS_BOOTSTRAP: tl.constexpr, HAS_CLIP: tl.constexpr,
    IS_POLICY: tl.constexpr, IS_VALUE: tl.constexpr, TARGET_GRAD: tl.constexpr,
    ACC: tl.constexpr, BT: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_i = tl.arange(0, BT)
    NT = tl.cdiv(T, BT)
    b_zero = tl.sum(tl.zeros([BT], dtype=ACC), axis=0)

    # The data checks' flag of the row (see _check_params): 1 where an input may be what the
    # checks refuse, computed from the values the passes load anyway.
    b_tol = tl.load(check_params).to(ACC)
    b_lim = tl.load(check_params + 1).to(ACC)
    b_bad = b_zero

    # ---- pass A: lambda-returns and residuals, blocks from the end, reversed inside ----
    b_hc = b_zero
    if HAS_BOOTSTRAP:
        b_boot = tl.load(bootstrap + i_b).to(ACC)
        b_hc += b_boot
        b_bad = tl.maximum(b_bad, tl.where(tl.abs(b_boot) < float("inf"), 0.0, 1.0).to(ACC))
    for i_n in range(0, NT):
        o_t = T - 1 - (i_n * BT + o_i)
        m_t = o_t >= 0
        b_m = (tl.load(mask + offsets64(i_b, s_m_b, o_t, s_m_t), mask=m_t, other=0) != 0) & m_t
        # Bounds-only masks (vector loads, no wait on the action mask): every value below is
        # used through a tl.where on b_m, so what is read off the mask never reaches a result.
        b_lp = tl.load(logp + offsets64(i_b, s_lp_b, o_t, s_lp_t), mask=m_t, other=0).to(ACC)
        b_ref = tl.load(ref_logp + offsets64(i_b, s_ref_b, o_t, s_ref_t), mask=m_t,
                        other=0).to(ACC)
        b_v = tl.load(values + offsets64(i_b, s_v_b, o_t, s_v_t), mask=m_t, other=0).to(ACC)
        b_r = tl.load(rewards + offsets64(i_b, s_r_b, o_t, s_r_t), mask=m_t, other=0).to(ACC)
        # on actions: finite, log-probs <= tol; off them: no reward (NaN included)
        b_ok = tl.where(b_m, (tl.abs(b_lp) < float("inf")) & (tl.abs(b_ref) < float("inf"))
                        & (tl.abs(b_v) < float("inf")) & (tl.abs(b_r) < float("inf"))
                        & (b_lp <= b_tol) & (b_ref <= b_tol), b_r == 0)
        b_bad = tl.maximum(b_bad, tl.max(tl.where(b_ok, 0.0, 1.0).to(ACC), axis=0))
        b_rt = b_r - beta * (b_lp - b_ref)
        b_a = tl.where(b_m, 0.0, 1.0).to(ACC)
        b_bb = tl.where(b_m, gamma, 0.0).to(ACC)
        b_c = tl.where(b_m, b_rt, 0.0).to(ACC)
        b_d = tl.where(b_m, gamma * lam, 1.0).to(ACC)
        b_e = tl.where(b_m, (1.0 - lam) * b_v + lam * b_rt, 0.0).to(ACC)
        b_a, b_bb, b_c, b_d, b_e = tl.associative_scan(
            (b_a, b_bb, b_c, b_d, b_e), axis=0, combine_fn=_compose_lambda)
        # G is only read on action positions, where the composed `a` is 0: no G carry needed.
        b_g = b_bb * b_hc + b_c
        b_h = b_d * b_hc + b_e
        b_hc = tl.sum(tl.where(o_i == BT - 1, b_h, 0.0), axis=0)
        b_g = tl.where(b_m, b_g, 0.0)
        b_delta = tl.where(b_m, b_v - b_g, 0.0)
        o_out = offsets64(i_b, T, o_t, 1)
        tl.store(returns + o_out, b_g.to(returns.dtype.element_ty), mask=m_t)
        tl.store(td_error + o_out, b_delta.to(td_error.dtype.element_ty), mask=m_t)

    # Pass B reads residuals that other threads of this program wrote.
    tl.debug_barrier()

    # ---- pass B: importance weights, losses and gradients, forward in time ----
    b_a_row = tl.load(row_scale + i_b).to(ACC)
    b_cc = b_zero
    b_ec = b_zero
    b_lpi = b_zero
    b_lv = b_zero
    for i_n in range(0, NT):
        o_t = i_n * BT + o_i
        m_t = o_t < T
        b_m = (tl.load(mask + offsets64(i_b, s_m_b, o_t, s_m_t), mask=m_t, other=0) != 0) & m_t
        # bounds-only masks, as in pass A: logp and behaviour enter through tl.where(b_m, ...)
        # only, and td_error is 0 off the mask (pass A wrote it)
        b_lp = tl.load(logp + offsets64(i_b, s_lp_b, o_t, s_lp_t), mask=m_t, other=0).to(ACC)
        if HAS_BEHAVIOR:
            b_beh = tl.load(behavior_logp + offsets64(i_b, s_beh_b, o_t, s_beh_t),
                            mask=m_t, other=0).to(ACC)
        else:
            b_beh = tl.load(ref_logp + offsets64(i_b, s_ref_b, o_t, s_ref_t), mask=m_t,
                            other=0).to(ACC)
        o_out = offsets64(i_b, T, o_t, 1)
        b_delta = tl.load(td_error + o_out, mask=m_t, other=0).to(ACC)

        b_dc = tl.where(b_m, b_lp - b_beh, 0.0)
        b_cum = tl.cumsum(b_dc, axis=0) + b_cc
        b_cc += tl.sum(b_dc, axis=0)
        # on actions: a finite behaviour log-prob <= tol, an untruncated log-weight <= limit
        b_ok = b_cum <= b_lim
        if HAS_BEHAVIOR:
            b_ok = b_ok & (tl.abs(b_beh) < float("inf")) & (b_beh <= b_tol)
        b_bad = tl.maximum(b_bad, tl.max(tl.where(b_m, tl.where(b_ok, 0.0, 1.0), 0.0).to(ACC),
                                          axis=0))
        if HAS_CLIP:
            b_cum = tl.minimum(b_cum, log_cap)
        b_w = tl.where(b_m, tl.exp(b_cum), 0.0)
        b_one = tl.where(b_m, 1.0, 0.0).to(ACC)
        if IS_POLICY:
            b_wpi = b_w
        else:
            b_wpi = b_one
        if IS_VALUE:
            b_wv = b_w
        else:
            b_wv = b_one
        b_gpi = b_a_row * b_wpi * b_delta
        b_gv = b_a_row * b_wv * b_delta
        b_lpi += tl.sum(0.5 * b_gpi * b_delta, axis=0)
        b_lv += tl.sum(0.5 * b_gv * b_delta, axis=0)
        if TARGET_GRAD:
            b_p = tl.where(b_m, gamma * lam, 1.0).to(ACC)
            b_p, b_q = tl.associative_scan((b_p, b_gpi), axis=0, combine_fn=_compose_affine)
            b_e = b_p * b_ec + b_q
            b_ec = tl.sum(tl.where(o_i == BT - 1, b_e, 0.0), axis=0)
        else:
            b_e = b_gpi
        tl.store(weights + o_out, b_w.to(weights.dtype.element_ty), mask=m_t)
        tl.store(dlogp + o_out, tl.where(b_m, beta * b_e, 0.0).to(dlogp.dtype.element_ty),
                 mask=m_t)
        tl.store(dvalues + o_out, b_gv.to(dvalues.dtype.element_ty), mask=m_t)
    tl.store(policy_rows + i_b, b_lpi.to(policy_rows.dtype.element_ty))
    tl.store(value_rows + i_b, b_lv.to(value_rows.dtype.element_ty))
    tl.store(flags + i_b, b_bad.to(flags.dtype.element_ty))


_CHECK_PARAMS: Dict[Tuple, torch.Tensor] = {}


def _check_params(dtype: torch.dtype, device: torch.device, hyper: DQOHyper) -> torch.Tensor:
    """The kernel's data-check thresholds ``[logprob_tol, log_limit]`` on the device, made once
    per (dtype, device, limit): its row flags are a superset of what the exact checks refuse.

    - ``logprob_tol``: the smallest :func:`~dqo_kernels.validation.logprob_tolerance` of the
      dtypes (a log-prob above it may be refused, whatever its dtype);
    - ``log_limit``: ``log(finfo.max) - 1`` where the importance-weight check applies (a
      margin for the kernel's and torch's cumsums rounding differently), else inf.
    """
    limit = log_weight_limit(dtype)
    checking = (hyper.is_policy or hyper.is_value) and log_clip(hyper.is_clip) > limit
    key = (dtype, device, checking)
    out = _CHECK_PARAMS.get(key)
    if out is None:
        out = torch.tensor([MIN_LOGPROB_TOLERANCE, limit - 1.0 if checking else math.inf],
                           dtype=dtype, device=device)
        _CHECK_PARAMS[key] = out
    return out


# Longest tile; a row longer than this is walked in several blocks with carries between them.
MAX_BLOCK_T = 1024


def _block_size(T: int) -> int:
    return max(16, min(MAX_BLOCK_T, triton.next_power_of_2(max(T, 1))))


@device_guard
def dqo_loss_forward(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                     row_scale: RowScale, hyper: DQOHyper,
                     data_checks: Optional[Callable[[], None]] = None, *,
                     block_size: Optional[int] = None) -> LaunchOutput:
    """Launch :func:`dqo_loss_fwd_kernel`, one program per row (the launcher signature of
    :mod:`.launch`).

    Inputs may be fp32/fp16/bf16 (fp64 computes in fp64) and arbitrarily strided; outputs are
    contiguous fp32 (fp64). ``block_size`` overrides the tile length (tests use it to cross
    block boundaries on short rows).

    ``data_checks``: run first; or, a :class:`~dqo_kernels.validation.DeferredChecks` (CUDA),
    handed the kernel's own flag (one reduction of its per-row flags, never read here): the
    checks run, exactly, only when the flag is read and set.
    """
    deferred = isinstance(data_checks, DeferredChecks)
    if data_checks is not None and not deferred:
        data_checks()
    B, T = logp.shape
    out_dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    acc = tl.float64 if out_dtype == torch.float64 else tl.float32
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    new = lambda: torch.empty((B, T), dtype=out_dtype, device=logp.device)  # noqa: E731
    # The kernel reads the inputs through their strides; what it writes is made here,
    # contiguous (it indexes the outputs as i_b * T + t and the [B] vectors as i_b).
    returns, weights, td_error, dlogp, dvalues = new(), new(), new(), new(), new()
    policy_rows = torch.empty(B, dtype=out_dtype, device=logp.device)
    value_rows = torch.empty(B, dtype=out_dtype, device=logp.device)
    flags = torch.empty(B, dtype=out_dtype, device=logp.device)
    beh = behavior_logp if behavior_logp is not None else ref_logp
    boot = bootstrap.contiguous() if bootstrap is not None else logp
    cap = log_clip(hyper.is_clip)
    BT = block_size or _block_size(T)
    if B > 0 and T > 0:
        dqo_loss_fwd_kernel[(B,)](
            logp, ref_logp, beh, values, rewards, mask_u8, boot, row_scale.tensor(out_dtype),
            returns, weights, td_error, dlogp, dvalues, policy_rows, value_rows,
            _check_params(out_dtype, logp.device, hyper), flags,
            *logp.stride(), *ref_logp.stride(), *beh.stride(), *values.stride(),
            *rewards.stride(), *mask_u8.stride(),
            T, float(hyper.beta), float(hyper.gamma), float(hyper.lam),
            cap if math.isfinite(cap) else 0.0,
            HAS_BEHAVIOR=behavior_logp is not None, HAS_BOOTSTRAP=bootstrap is not None,
            HAS_CLIP=math.isfinite(cap), IS_POLICY=bool(hyper.is_policy),
            IS_VALUE=bool(hyper.is_value), TARGET_GRAD=bool(hyper.target_grad), ACC=acc, BT=BT,
            num_warps=4 if BT >= 512 else 2,
        )
        if deferred:
            data_checks.defer(flags.amax() > 0)
    else:
        policy_rows.zero_()
        value_rows.zero_()
        if deferred:  # nothing ran: a read runs the checks (a NaN bootstrap, say)
            data_checks.defer(torch.ones((), dtype=torch.bool, device=logp.device))
    return LaunchOutput(policy_rows, value_rows, returns, weights, td_error, dlogp, dvalues)
