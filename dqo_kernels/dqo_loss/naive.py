"""Plain PyTorch definition of the DQO loss (docs/math.md §3): the reference every backend is
tested against, and the backend ``"torch"``, the fallback where neither Triton nor the native
CPU kernel can run.

It is written for clarity, not speed: the lambda-return is a Python loop over T that carries
``[B]`` vectors, and every gradient comes from autograd through explicit stop-gradients
(``detach``), so it checks the closed-form gradients of the kernels rather than repeating them.
It works in float32 and float64 (pass float64 inputs for a high-precision reference).

:func:`dqo_scan_reference` is the definition (public); :func:`dqo_loss_forward` is the same
math behind the launcher signature of every backend (:mod:`.launch`), its gradients taken by
autograd.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ..dtypes import acc_dtype
from .aggregation import RowScale
from .importance import cumulative_log_ratio, log_clip
from .launch import DQOHyper, DQOScanResult, LaunchOutput


class _Terms(NamedTuple):
    policy: torch.Tensor  # [B, T] a_t w_pi_t 0.5 delta_t^2, 0 off the mask
    value: torch.Tensor  # [B, T] a_t w_V_t 0.5 (V_t - G_t)^2, 0 off the mask
    returns: torch.Tensor
    weights: torch.Tensor
    td_error: torch.Tensor


def dqo_scan_reference(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    behavior_logp: Optional[torch.Tensor] = None,
    bootstrap: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    lam: float = 1.0,
    gamma: float = 1.0,
    is_clip: float = 1.0,
    is_policy: bool = True,
    is_value: bool = True,
    target_grad: bool = False,
) -> DQOScanResult:
    """DQO losses for padded ``[B, T]`` tensors, by definition.

    With ``l_t = logp_t - ref_logp_t``, ``rt_t = r_t - beta * sg(l_t)`` and, for the last action
    of a row, ``Vn = Gn = bootstrap``::

        c_t     = sum_{actions j <= t} (sg(logp_j) - behavior_logp_j)
        w_t     = exp(min(c_t, log C))
        G_t     = rt_t + gamma * ((1 - lam) * sg(V_next) + lam * G_next)
        delta_t = beta * l_t + sg(V_t) - (r_t + gamma * ((1 - lam) * sg(V_next) + lam * G_next))
        L_pi    = sum_t a_t * w_pi_t * 0.5 * delta_t^2      (gradient through l_t)
        L_V     = sum_t a_t * w_V_t * 0.5 * (V_t - sg(G_t))^2  (gradient through V_t)

    ``G_next`` in ``L_pi`` is a stop-gradient unless ``target_grad``. ``a_t = row_scale[b]``
    (see :mod:`dqo_kernels.dqo_loss.aggregation`). Masked-out positions are pass-through: they
    are skipped by the recurrences and contribute neither loss nor gradient, whatever they hold.
    """
    t = _loss_terms(logp, ref_logp, values, rewards, mask, row_scale, behavior_logp, bootstrap,
                    beta, lam, gamma, is_clip, is_policy, is_value, target_grad)
    return DQOScanResult(t.policy.sum(), t.value.sum(), t.returns, t.weights, t.td_error)


def _loss_terms(logp, ref_logp, values, rewards, mask, row_scale, behavior_logp, bootstrap,
                beta, lam, gamma, is_clip, is_policy, is_value, target_grad) -> _Terms:
    """The per-position losses of :func:`dqo_scan_reference`, differentiable."""
    mask = mask.bool()
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)

    def clean(x: Optional[torch.Tensor], grad: bool = False) -> Optional[torch.Tensor]:
        # Zero everything off the mask so that nothing there (NaN padding included) can leak
        # into the loss or the gradients.
        if x is None:
            return None
        x = x.to(dtype) if grad else x.detach().to(dtype)
        return torch.where(mask, x, torch.zeros((), dtype=dtype, device=x.device))

    logp_ = clean(logp, grad=True)
    values_ = clean(values, grad=True)
    ref_ = clean(ref_logp)
    rewards_ = clean(rewards)
    behavior_ = ref_ if behavior_logp is None else clean(behavior_logp)
    B, T = logp.shape
    boot = (
        torch.zeros(B, dtype=dtype, device=logp.device)
        if bootstrap is None
        else bootstrap.detach().to(dtype)
    )

    # Truncated cumulative importance weight, inclusive of t, never differentiated.
    c = cumulative_log_ratio(logp_, behavior_, mask, dtype)
    w = torch.exp(torch.clamp(c, max=log_clip(is_clip)))
    w = torch.where(mask, w, torch.zeros((), dtype=dtype, device=w.device))

    log_ratio = logp_ - ref_
    l_target = log_ratio if target_grad else log_ratio.detach()
    v_sg = values_.detach()

    # Backward lambda-return. G_next / V_next are carried across masked positions unchanged.
    g_next, v_next = boot, boot
    targets = [None] * T  # r_t + gamma * ((1 - lam) * V_next + lam * G_next)
    for t in reversed(range(T)):
        m = mask[:, t]
        target_t = rewards_[:, t] + gamma * ((1.0 - lam) * v_next + lam * g_next)
        g_t = target_t - beta * l_target[:, t]
        targets[t] = target_t
        g_next = torch.where(m, g_t, g_next)
        v_next = torch.where(m, v_sg[:, t], v_next)
    target = torch.stack(targets, dim=1) if T > 0 else torch.zeros_like(logp_)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    returns = torch.where(mask, (target - beta * log_ratio).detach(), zero)

    delta_pi = beta * log_ratio + v_sg - target
    w_pi = w if is_policy else mask.to(dtype)
    w_v = w if is_value else mask.to(dtype)
    a = row_scale.detach().to(dtype)[:, None]
    policy = torch.where(mask, a * w_pi * 0.5 * delta_pi.square(), zero)
    value = torch.where(mask, a * w_v * 0.5 * (values_ - returns).square(), zero)
    td_error = torch.where(mask, values_.detach() - returns, zero)
    return _Terms(policy, value, returns, w, td_error)


def dqo_loss_forward(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                     row_scale: RowScale, hyper: DQOHyper,
                     data_checks: Optional[Callable[[], None]] = None) -> LaunchOutput:
    """The launcher of the backend ``"torch"`` (:mod:`.launch`): the per-row sums of
    :func:`dqo_scan_reference`'s losses, and their gradients by autograd."""
    if data_checks is not None:
        data_checks()
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    scale = row_scale.tensor(dtype)
    if torch.is_inference_mode_enabled():  # no autograd here, and no backward can follow
        t = _loss_terms(logp, ref_logp, values, rewards, mask, scale, behavior_logp, bootstrap,
                        **hyper._asdict())
        return LaunchOutput(t.policy.sum(dim=1), t.value.sum(dim=1), t.returns, t.weights,
                            t.td_error, None, None, t.policy.sum(), t.value.sum())
    with torch.enable_grad():
        logp, values = logp.detach().requires_grad_(), values.detach().requires_grad_()
        t = _loss_terms(logp, ref_logp, values, rewards, mask, scale, behavior_logp, bootstrap,
                        **hyper._asdict())
        policy, value = t.policy.sum(), t.value.sum()  # as dqo_scan_reference sums them
        grads = torch.autograd.grad(policy + value, [logp, values], allow_unused=True)
    dlogp, dvalues = (torch.zeros_like(x) if g is None else g
                      for g, x in zip(grads, (logp, values)))
    policy_rows, value_rows = t.policy.detach().sum(dim=1), t.value.detach().sum(dim=1)
    return LaunchOutput(policy_rows, value_rows, t.returns, t.weights, t.td_error, dlogp,
                        dvalues, policy.detach(), value.detach())
