"""Autograd wiring of the kernel backends of the fused DQO loss.

The kernels produce the closed-form gradients of SPEC 3.7/3.8 in the same pass as the forward
(``dL_pi/dlogp`` and ``dL_V/dvalues``), so the losses come out of one autograd node whose
backward is a scale of the kernel's gradients: no second pass over the data, and one node per
call (its fixed cost is a good part of a small batch's time on CPU).

Backward hands each gradient buffer over to autograd (which keeps it as ``.grad`` without a
copy) and forgets it, so ``policy_loss.backward()`` and ``value_loss.backward()`` can be called
separately (one DeepSpeed engine per model) without ``retain_graph``, and ``loss.backward()``
costs no ``[B, T]`` copy. A second backward through the same node (``retain_graph=True``)
recomputes the gradients from the inputs, after checking that none was changed in place.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .dqo_scan_reference import DQOScanResult

# A row launcher maps the prepared inputs and the row scale to
# (policy_rows [B], value_rows [B], returns, weights, td_error, dlogp, dvalues).
Launcher = Callable[..., Tuple[torch.Tensor, ...]]
# A loss launcher takes no argument and returns
# (policy_loss [], value_loss [], returns, weights, td_error, dlogp, dvalues).
LossLauncher = Callable[[], Tuple[torch.Tensor, ...]]


def _total(*grads: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    given = [g for g in grads if g is not None]
    if not given:
        return None
    return given[0] if len(given) == 1 else sum(given[1:], given[0])


def _scaled(grad: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # loss.backward() passes g = 1: on CPU (where reading it costs no sync) hand the buffer
    # over as it is, instead of a [B, T] multiply into new memory (a fixed cost of every call)
    if not (g.device.type == "cpu" and g.numel() == 1 and float(g) == 1.0):
        grad = grad * g
    return grad if grad.dtype == dtype else grad.to(dtype)


class ClosedFormLosses(torch.autograd.Function):
    """``(loss, policy_loss, value_loss, returns, weights, td_error)`` of ``launch``, whose
    gradients to ``logp`` and ``values`` the launcher already computed; ``logp`` and ``values``
    are the autograd inputs, and ``inputs`` every tensor the launcher reads (checked for
    in-place changes before a recompute)."""

    @staticmethod
    def forward(ctx, logp, values, launch: LossLauncher, inputs: Tuple):
        policy, value, returns, weights, td, dlogp, dvalues = launch()
        ctx.set_materialize_grads(False)
        ctx.launch, ctx.inputs = launch, inputs
        ctx.versions = [None if x is None else x._version for x in inputs]
        ctx.grads = [dlogp, dvalues]
        ctx.dtypes = (logp.dtype, values.dtype)
        ctx.mark_non_differentiable(returns, weights, td)
        if not logp.requires_grad:
            ctx.mark_non_differentiable(policy)
        if not values.requires_grad:
            ctx.mark_non_differentiable(value)
        return policy + value, policy, value, returns, weights, td

    @staticmethod
    def backward(ctx, g_loss, g_policy, g_value, *_):
        gs = [_total(g_loss, g_policy), _total(g_loss, g_value)]
        need = [g is not None and ctx.needs_input_grad[i] for i, g in enumerate(gs)]
        if any(n and grad is None for n, grad in zip(need, ctx.grads)):
            _recompute(ctx)
        out = []
        for i in range(2):
            if not need[i]:
                out.append(None)
                continue
            grad, ctx.grads[i] = ctx.grads[i], None  # autograd may keep it as .grad
            out.append(_scaled(grad, gs[i], ctx.dtypes[i]))
        return out[0], out[1], None, None


def _recompute(ctx) -> None:
    """The gradients again, for a second backward through a node that handed them out."""
    for x, version in zip(ctx.inputs, ctx.versions):
        if x is not None and x._version != version:
            raise RuntimeError(
                "fused_dqo_loss: an input of the loss was modified in place after the forward "
                "(a second backward through the same graph needs it unchanged); compute the "
                "loss again instead")
    with torch.no_grad():
        grads = ctx.launch()[-2:]
    ctx.grads = [ctx.grads[i] if ctx.grads[i] is not None else grads[i] for i in range(2)]


def closed_form(launch: LossLauncher, logp: torch.Tensor, values: torch.Tensor,
                inputs: Tuple = ()) -> Tuple[torch.Tensor, DQOScanResult]:
    """``(loss, result)`` of a loss launcher, differentiable in ``logp`` and ``values``;
    ``inputs``: the other tensors it reads."""
    if torch.is_grad_enabled() and (logp.requires_grad or values.requires_grad):
        loss, *res = ClosedFormLosses.apply(logp, values, launch, (logp, values, *inputs))
        return loss, DQOScanResult(*res)
    with torch.no_grad():
        policy, value, returns, weights, td, _, _ = launch()
    return policy + value, DQOScanResult(policy, value, returns, weights, td)


def run_closed_form(launch: Launcher, logp, values, ref_logp, rewards, mask, behavior_logp,
                    bootstrap, row_scale, params: Dict) -> DQOScanResult:
    """The losses of a row launcher (the Triton kernel's convention)."""
    def losses():
        policy_rows, value_rows, *rest = launch(
            logp.detach(), ref_logp, values.detach(), rewards, mask, behavior_logp, bootstrap,
            row_scale, **params)
        return (policy_rows.sum(), value_rows.sum(), *rest)
    return closed_form(losses, logp, values,
                       (ref_logp, rewards, mask, behavior_logp, bootstrap, row_scale))[1]
