"""Autograd wiring of the kernel backends of the fused DQO loss.

The kernels produce the closed-form gradients of SPEC 3.7/3.8 in the same pass as the forward
(``dL_pi/dlogp`` and ``dL_V/dvalues``), so each loss becomes its own autograd node whose
backward is a scale of a saved gradient: no second pass over the data. The two nodes are
independent, so ``policy_loss.backward()`` and ``value_loss.backward()`` can be called separately
(one DeepSpeed engine per model) without ``retain_graph``, and ``(policy + value).backward()``
works as well.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from .dqo_scan_reference import DQOScanResult

# A launcher maps the prepared inputs to
# (policy_rows [B], value_rows [B], returns, weights, td_error, dlogp, dvalues).
Launcher = Callable[..., Tuple[torch.Tensor, ...]]


class PrecomputedGradLoss(torch.autograd.Function):
    """``loss`` as a function of ``x`` whose gradient ``dloss/dx`` is already known."""

    @staticmethod
    def forward(ctx, x, loss, grad):
        ctx.save_for_backward(grad)
        ctx.x_dtype = x.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        # loss.backward() passes g = 1: on CPU (where reading it costs no sync) skip the
        # [B, T] multiply, a fixed cost of every call on small batches
        if not (g.device.type == "cpu" and g.numel() == 1 and float(g) == 1.0):
            grad = grad * g
        return (grad if grad.dtype == ctx.x_dtype else grad.to(ctx.x_dtype)), None, None


def run_closed_form(launch: Launcher, logp, values, ref_logp, rewards, mask, behavior_logp,
                    bootstrap, row_scale, params: Dict) -> DQOScanResult:
    with torch.no_grad():
        policy_rows, value_rows, returns, weights, td_error, dlogp, dvalues = launch(
            logp.detach(), ref_logp, values.detach(), rewards, mask, behavior_logp, bootstrap,
            row_scale, **params,
        )
    policy_loss, value_loss = policy_rows.sum(), value_rows.sum()
    if logp.requires_grad and torch.is_grad_enabled():
        policy_loss = PrecomputedGradLoss.apply(logp, policy_loss, dlogp)
    if values.requires_grad and torch.is_grad_enabled():
        value_loss = PrecomputedGradLoss.apply(values, value_loss, dvalues)
    return DQOScanResult(policy_loss, value_loss, returns, weights, td_error)
