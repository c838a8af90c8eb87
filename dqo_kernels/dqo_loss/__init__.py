"""The fused DQO loss, one module per backend: :func:`fused_dqo_loss` and :func:`dro_loss`.

This module validates inputs, describes the aggregation as per-row factors, picks a backend and
computes the diagnostics; the math lives in the backends, each a module with the one launcher
signature of :mod:`.launch` (``dqo_loss_forward``), wired into autograd by :mod:`.autograd`:

- ``"triton"``: :mod:`.triton` (CUDA tensors; on CPU only under ``TRITON_INTERPRET=1``, which
  is how the tests run it),
- ``"cpp"``: :mod:`.cpp` (CPU tensors, native C++ kernel),
- ``"torch"``: :mod:`.naive` (anywhere; the definition).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple, Union

import torch

from ..backends import resolve_backend
from ..dtypes import acc_dtype
from ..packing import check_cu_seqlens, pack, unpack
from ..validation import (
    DeferredChecks,
    PendingChecks,
    check_mask,
    check_pending,
    check_scalar,
    check_tensor,
    data_checks_enabled,
    defer_checks,
    run_checks,
)
from .aggregation import LOSS_AGGS, RowScale
from .autograd import run_launcher
from .backends import backend_module as _impl
from .checks import data_checks, loss_checks
from .launch import DQOHyper
from .metrics import LazyMetrics, clipped_weights, dqo_metrics

__all__ = ["DQOLossOutput", "dro_loss", "fused_dqo_loss"]


@dataclass
class DQOLossOutput:
    """Result of :func:`fused_dqo_loss`; ``loss = policy_loss + value_loss``."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    returns: torch.Tensor  # [B, T] lambda-returns G_t (0 off the mask), detached
    weights: torch.Tensor  # [B, T] truncated importance weights w_t (0 off the mask), detached
    td_error: torch.Tensor  # [B, T] delta_t = V_t - G_t (0 off the mask), detached
    # docs/math.md §5, detached 0-dim tensors; computed on first access
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # the call's data checks where they were deferred (CUDA): read by check()
    pending_checks: Tuple[PendingChecks, ...] = field(default=(), repr=False)

    def check(self) -> None:
        """Raise what the data checks of this call refuse. On CPU they already ran during
        the call; on CUDA this reads their flags (one host synchronisation), as the first
        access to :attr:`metrics` and the next call of any op do."""
        for pending in self.pending_checks:
            pending.check()


def fused_dqo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
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
    loss_agg: str = "token-mean",
    num_tokens: Optional[Union[int, float, torch.Tensor]] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> DQOLossOutput:
    """DQO policy (soft-Q) and value losses over padded ``[B, T]`` token sequences.

    Every ``[B, T]`` tensor is aligned on the action position t (docs/math.md §2): ``logp[b, t]``
    is ``log pi_theta(input_ids[b, t] | input_ids[b, :t])`` and ``values[b, t] = V(s_t)``.

    Args:
        logp: log-probs of the taken tokens under the policy; receives the policy gradient.
        ref_logp: the same under the reference policy (no gradient).
        values: ``V(s_t)`` from the value model; receives the value gradient.
        rewards: reward of each action (outcome reward on the last one, process rewards on
            step ends); must be 0 where ``mask`` is 0.
        mask: 1 on the policy's actions (response tokens); 0 on prompt, padding and tokens the
            environment inserted. Masked positions are pass-through for the recurrences.
        behavior_logp: log-probs under the policy that sampled the data; None = ``ref_logp``.
        bootstrap: ``[B]`` value of the state after the last action (responses cut at a length
            limit); None = 0 (responses ended with EOS).
        beta: KL coefficient, finite and > 0.
        lam, gamma: lambda-return parameters, ``lam`` in [0, 1], ``gamma`` in (0, 1].
        is_clip: cap ``C >= 1`` of the cumulative importance ratio; ``float('inf')``: none.
            With the data checks on, a batch whose weights would overflow the compute dtype
            (``c_t > log(finfo.max)``, 88.7 in fp32, with no cap below that) is a ValueError;
            with them off, the loss is then inf or NaN.
        is_policy, is_value: apply the importance weights to the policy / value loss.
        target_grad: let the policy gradient flow through the lambda-return target too.
        loss_agg: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum``.
        num_tokens: global action-token count for ``token-mean`` across micro-batches
            (finite, >= 1; a fraction such as tokens / ranks is fine).
        cu_seqlens: ``[S + 1]`` boundaries of packed sequences (:mod:`dqo_kernels.packing`):
            the ``[B, T]`` tensors hold S sequences end to end in row-major order (usually
            ``B = 1``), and no recurrence crosses a boundary; ``bootstrap`` is then ``[S]`` and
            the ``seq-mean-*`` aggregations average over sequences. None: one sequence a row.
        backend: None (auto: triton on CUDA, the native kernel on CPU), "triton", "cpp",
            "torch".

    Returns:
        :class:`DQOLossOutput`; gradients of ``loss`` flow to ``logp`` and ``values`` only.
    """
    check_tensor("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp: expected a [B, T] tensor, got shape {tuple(logp.shape)}")
    if cu_seqlens is not None:
        return _packed_loss(
            cu_seqlens, logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
            dict(beta=beta, lam=lam, gamma=gamma, is_clip=is_clip, is_policy=is_policy,
                 is_value=is_value, target_grad=target_grad, loss_agg=loss_agg,
                 num_tokens=num_tokens, backend=backend))
    shape, device = tuple(logp.shape), logp.device
    compiling = torch.compiler.is_compiling()
    checking = data_checks_enabled()
    deferring = checking and not compiling and defer_checks(device)
    if deferring:
        check_pending(wait=False)  # past calls' flags that reached the host
    deferred = [] if deferring else None
    for name, x in (("ref_logp", ref_logp), ("values", values), ("rewards", rewards)):
        check_tensor(name, x, shape=shape, device=device)
    if behavior_logp is not None:
        check_tensor("behavior_logp", behavior_logp, shape=shape, device=device)
    if bootstrap is not None:
        check_tensor("bootstrap", bootstrap, shape=(shape[0],), device=device)
    mask = check_mask(mask, shape, device, deferred)
    beta = check_scalar("beta", beta, low=0.0, low_open=True, high_open=True)
    lam = check_scalar("lam", lam, low=0.0, high=1.0)
    gamma = check_scalar("gamma", gamma, low=0.0, high=1.0, low_open=True)
    is_clip = check_scalar("is_clip", is_clip, low=1.0)
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg: expected one of {LOSS_AGGS}, got {loss_agg!r}")
    if num_tokens is not None:
        # A count below one token would be clamped to one by row_scale: refuse it instead.
        num_tokens = check_scalar("num_tokens", num_tokens, low=1.0, high_open=True)
        if loss_agg != "token-mean":
            raise ValueError(f"num_tokens: only applies to loss_agg='token-mean', got "
                             f"loss_agg={loss_agg!r}")
    backend = resolve_backend(backend, device)
    compute_dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    behavior = ref_logp if behavior_logp is None else behavior_logp
    hyper = DQOHyper(beta=beta, lam=lam, gamma=gamma, is_clip=is_clip, is_policy=bool(is_policy),
                     is_value=bool(is_value), target_grad=bool(target_grad))
    pending: Tuple[PendingChecks, ...] = ()
    if compiling:
        # under torch.compile: the launch and each loss's gradient as torch.library custom ops
        from .custom_op import compiled_loss
        loss, res = compiled_loss(logp, ref_logp, values, rewards, mask, behavior_logp,
                                  bootstrap, loss_agg, num_tokens, hyper, backend, checking)
    else:
        # Each backend runs the checks before it reads the data, or (the native kernel) looks
        # for bad inputs in its own passes and runs them only if it found some (the exact
        # errors are theirs).
        checks = None
        if deferring and backend == "triton":
            # the kernel flags its rows in its own passes; the exact checks run when the flag
            # is read and set (a non-bool mask's 0/1 check: tensor ops, flags on device)
            checks = DeferredChecks(data_checks(logp, ref_logp, values, rewards, mask,
                                                behavior_logp, bootstrap, is_clip, is_policy,
                                                is_value))
            pending = (run_checks(deferred, defer=True),)
        elif deferring:
            # the checks' flags by tensor ops, on the device, read later
            pending = (run_checks(deferred + loss_checks(
                logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, is_clip,
                is_policy, is_value), defer=True),)
        elif checking:
            checks = data_checks(logp, ref_logp, values, rewards, mask, behavior_logp,
                                 bootstrap, is_clip, is_policy, is_value)
        loss, res = run_launcher(_impl(backend).dqo_loss_forward, logp, ref_logp, values,
                                 rewards, mask, behavior_logp, bootstrap,
                                 RowScale(mask, loss_agg, num_tokens), hyper, checks)
        if isinstance(checks, DeferredChecks):
            pending = (*pending, checks.pending)
        pending = tuple(p for p in pending if p is not None)

    def metrics():
        for p in pending:
            p.check()  # the metrics of a batch the checks refuse are not reported
        log_ratio = logp.detach().to(compute_dtype) - ref_logp.detach().to(compute_dtype)
        clipped = clipped_weights(logp, behavior, mask, is_clip, compute_dtype)
        return dqo_metrics(res.returns, values.detach(), res.td_error, res.weights, log_ratio,
                           mask, clipped)

    return DQOLossOutput(
        loss=loss,
        policy_loss=res.policy_loss,
        value_loss=res.value_loss,
        returns=res.returns,
        weights=res.weights,
        td_error=res.td_error,
        metrics=LazyMetrics(metrics),
        pending_checks=pending,
    )


def _packed_loss(cu_seqlens, logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                 options) -> DQOLossOutput:
    """:func:`fused_dqo_loss` on packed sequences: the backends run on the sequences laid out
    one a row (:func:`~dqo_kernels.packing.unpack`), whose per-token outputs are packed back;
    the gradients reach the packed ``logp`` and ``values`` through the layout's gather."""
    shape, device = tuple(logp.shape), logp.device
    for name, x in (("ref_logp", ref_logp), ("values", values), ("rewards", rewards),
                    ("behavior_logp", behavior_logp)):
        if x is not None:
            check_tensor(name, x, shape=shape, device=device)
    check_tensor("mask", mask, shape=shape, floating=False, device=device)
    cu = check_cu_seqlens(cu_seqlens, logp.numel(), device)
    if bootstrap is not None:
        check_tensor("bootstrap", bootstrap, shape=(cu.numel() - 1,), device=device)

    def rows(x, fill=0):
        return None if x is None else unpack(x, cu, fill)

    out = fused_dqo_loss(rows(logp), rows(ref_logp), rows(values), rows(rewards),
                         rows(mask, False), behavior_logp=rows(behavior_logp),
                         bootstrap=bootstrap, **options)
    out.returns, out.weights, out.td_error = (
        pack(x, cu, shape) for x in (out.returns, out.weights, out.td_error))
    return out


def dro_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    *,
    behavior_logp: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    is_clip: float = 1.0,
    is_policy: bool = False,
    is_value: bool = False,
    num_sequences: Optional[Union[int, float, torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> DQOLossOutput:
    """Direct Reward Optimization (Richemond et al., 2024): DQO with one action per response.

    Inputs are ``[B]`` (or ``[B, 1]``): each response's summed log-probs under the policy and
    the reference, ``V(prompt)`` and the total reward. Then ``G = r - beta * sg(l)`` and::

        L = mean_b  0.5 * (beta * l_b + V_b - r_b)^2   (policy through l, value through V)

    DRO as published has no importance weighting, so ``is_policy`` and ``is_value`` default to
    False here; turn them on for the sequence-level analogue of DQO's weights. ``num_sequences``
    is the global batch size when a batch is split into micro-batches.
    """
    if num_sequences is not None:
        check_scalar("num_sequences", num_sequences, low=1.0, high_open=True)

    def as_col(name, x):
        if x is None:
            return None
        check_tensor(name, x)
        if x.dim() == 1:
            return x[:, None]
        if x.dim() == 2 and x.shape[1] == 1:
            return x
        raise ValueError(f"{name}: expected shape [B] or [B, 1], got {tuple(x.shape)}")

    logp_c = as_col("logp", logp)
    out = fused_dqo_loss(
        logp_c, as_col("ref_logp", ref_logp), as_col("values", values),
        as_col("rewards", rewards),
        torch.ones(logp_c.shape, dtype=torch.bool, device=logp_c.device),
        behavior_logp=as_col("behavior_logp", behavior_logp), beta=beta, is_clip=is_clip,
        is_policy=is_policy, is_value=is_value, loss_agg="token-mean",
        num_tokens=num_sequences, backend=backend,
    )
    if logp.dim() == 1:
        out.returns, out.weights, out.td_error = (
            out.returns[:, 0], out.weights[:, 0], out.td_error[:, 0])
    return out
