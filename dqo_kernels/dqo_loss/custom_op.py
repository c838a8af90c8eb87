"""The fused DQO loss as ``torch.library`` custom ops, the path :func:`fused_dqo_loss` takes
under ``torch.compile`` (``fullgraph=True`` included): the compiler sees two opaque ops with
fake (meta) implementations and a registered autograd formula, instead of a Python
``autograd.Function`` that hands buffers over by side effect (which Dynamo refuses: "Unsafe
side effect").

- ``dqo_kernels::dqo_loss_launch``: the backend's launcher (:mod:`.launch`) on detached
  inputs, data checks included (inside the op, so a host read never breaks the graph);
  returns both losses, the diagnostics and the closed-form gradients, in the compute dtype.
- ``dqo_kernels::precomputed_grad_loss``: ``loss`` as a function of ``x`` whose gradient is
  ``grad`` (the closed form), one per loss, so the policy and value losses stay independent
  autograd nodes as in eager.

Eager calls do not go through these ops: they keep :mod:`.autograd`'s zero-copy gradient
hand-over (the values are the same: the launcher and its gradients are the same code).
"""
from __future__ import annotations

__all__ = ["compiled_loss", "dqo_loss_checks", "dqo_loss_launch", "precomputed_grad_loss"]

from typing import Optional, Tuple

import torch

from ..dtypes import acc_dtype
from .aggregation import RowScale
from .backends import backend_module
from .checks import data_checks
from .launch import DQOHyper, DQOScanResult


def _launcher(backend: str):
    return backend_module(backend).dqo_loss_forward


@torch.library.custom_op("dqo_kernels::dqo_loss_launch", mutates_args=())
def dqo_loss_launch(
    logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor, rewards: torch.Tensor,
    mask: torch.Tensor, behavior_logp: Optional[torch.Tensor],
    bootstrap: Optional[torch.Tensor], loss_agg: str, num_tokens: Optional[float],
    beta: float, lam: float, gamma: float, is_clip: float, is_policy: bool, is_value: bool,
    target_grad: bool, backend: str, checks: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    hyper = DQOHyper(beta, lam, gamma, is_clip, is_policy, is_value, target_grad)
    run = data_checks(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, is_clip,
                      is_policy, is_value) if checks else None
    out = _launcher(backend)(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                             RowScale(mask, loss_agg, num_tokens), hyper, run)
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    policy = out.policy_rows.sum() if out.policy_loss is None else out.policy_loss
    value = out.value_rows.sum() if out.value_loss is None else out.value_loss
    dlogp = torch.zeros_like(out.returns) if out.dlogp is None else out.dlogp
    dvalues = torch.zeros_like(out.returns) if out.dvalues is None else out.dvalues
    # fresh tensors of fixed dtypes (a custom op's outputs may not alias each other)
    return tuple(x.to(dtype).clone() if x.dtype != dtype or x._base is not None else x
                 for x in (policy, value, out.returns, out.weights, out.td_error, dlogp,
                           dvalues))


@dqo_loss_launch.register_fake
def _(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, loss_agg, num_tokens,
      beta, lam, gamma, is_clip, is_policy, is_value, target_grad, backend, checks):
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    scalar = logp.new_empty((), dtype=dtype)
    full = [logp.new_empty(logp.shape, dtype=dtype) for _ in range(5)]
    return (scalar, scalar.new_empty(()), *full)


@torch.library.custom_op("dqo_kernels::precomputed_grad_loss", mutates_args=())
def precomputed_grad_loss(x: torch.Tensor, loss: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    return loss.clone()


@precomputed_grad_loss.register_fake
def _(x, loss, grad):
    return torch.empty_like(loss)


def _setup(ctx, inputs, output):
    x, _, grad = inputs
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(grad)


def _backward(ctx, g):
    (grad,) = ctx.saved_tensors
    return (grad * g).to(ctx.x_dtype), None, None


precomputed_grad_loss.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("dqo_kernels::dqo_loss_checks", mutates_args=())
def dqo_loss_checks(logp: torch.Tensor, ref_logp: torch.Tensor, values: torch.Tensor,
                    rewards: torch.Tensor, mask: torch.Tensor,
                    behavior_logp: Optional[torch.Tensor], bootstrap: Optional[torch.Tensor],
                    is_clip: float, is_policy: bool, is_value: bool) -> torch.Tensor:
    """Raise what the data checks refuse; else a 0 (added to the loss, so that the op is
    kept in the graph)."""
    data_checks(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, is_clip,
                is_policy, is_value)()
    return logp.new_zeros((), dtype=acc_dtype(logp, ref_logp, values, rewards, behavior_logp,
                                              bootstrap))


@dqo_loss_checks.register_fake
def _(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap, is_clip, is_policy,
      is_value):
    return logp.new_empty((), dtype=acc_dtype(logp, ref_logp, values, rewards, behavior_logp,
                                              bootstrap))


def _definition(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                loss_agg: str, num_tokens: Optional[float], hyper: DQOHyper, checks: bool
                ) -> Tuple[torch.Tensor, DQOScanResult]:
    """The backend ``"torch"`` under torch.compile: the definition's tensor ops, traced and
    differentiated as they are (its eager launcher calls autograd itself, which an op's
    implementation cannot)."""
    from .naive import _loss_terms
    dtype = acc_dtype(logp, ref_logp, values, rewards, behavior_logp, bootstrap)
    scale = RowScale(mask, loss_agg, num_tokens).tensor(dtype)
    t = _loss_terms(logp, ref_logp, values, rewards, mask, scale, behavior_logp, bootstrap,
                    **hyper._asdict())
    policy, value = t.policy.sum(), t.value.sum()
    if checks:
        policy = policy + dqo_loss_checks(
            logp.detach(), ref_logp.detach(), values.detach(), rewards.detach(), mask,
            None if behavior_logp is None else behavior_logp.detach(),
            None if bootstrap is None else bootstrap.detach(), hyper.is_clip,
            hyper.is_policy, hyper.is_value)
    return policy + value, DQOScanResult(policy, value, t.returns, t.weights, t.td_error)


def compiled_loss(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                  loss_agg: str, num_tokens: Optional[float], hyper: DQOHyper, backend: str,
                  checks: bool) -> Tuple[torch.Tensor, DQOScanResult]:
    """``(loss, result)`` as :func:`.autograd.run_launcher` gives them, through the ops."""
    if backend == "torch":
        return _definition(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                           loss_agg, num_tokens, hyper, checks)
    policy, value, returns, weights, td, dlogp, dvalues = dqo_loss_launch(
        logp.detach(), ref_logp.detach(), values.detach(), rewards.detach(), mask,
        None if behavior_logp is None else behavior_logp.detach(),
        None if bootstrap is None else bootstrap.detach(), loss_agg,
        None if num_tokens is None else float(num_tokens), *hyper, backend, checks)
    if torch.is_grad_enabled() and logp.requires_grad:
        policy = precomputed_grad_loss(logp, policy, dlogp)
    if torch.is_grad_enabled() and values.requires_grad:
        value = precomputed_grad_loss(values, value, dvalues)
    return policy + value, DQOScanResult(policy, value, returns, weights, td)

