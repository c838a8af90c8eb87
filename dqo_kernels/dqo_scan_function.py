"""Autograd wrapper shared by the kernel backends of the fused DQO loss.

The kernels produce the closed-form gradients of SPEC 3.7/3.8 in the same pass as the forward
(``dL_pi/dlogp`` and ``dL_V/dvalues``), so backward is only a scale by the upstream gradients
of the two loss scalars: no second pass over the data and nothing else saved.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

# A launcher maps the prepared inputs to
# (policy_rows [B], value_rows [B], returns, weights, td_error, dlogp, dvalues).
Launcher = Callable[..., Tuple[torch.Tensor, ...]]


class DQOScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch: Launcher, logp, values, ref_logp, rewards, mask, behavior_logp,
                bootstrap, row_scale, params: Dict):
        policy_rows, value_rows, returns, weights, td_error, dlogp, dvalues = launch(
            logp.detach(), ref_logp, values.detach(), rewards, mask, behavior_logp, bootstrap,
            row_scale, **params,
        )
        ctx.save_for_backward(dlogp, dvalues)
        ctx.dtypes = (logp.dtype, values.dtype)
        ctx.mark_non_differentiable(returns, weights, td_error)
        return policy_rows.sum(), value_rows.sum(), returns, weights, td_error

    @staticmethod
    def backward(ctx, g_policy, g_value, *_):
        dlogp, dvalues = ctx.saved_tensors
        grad_logp = grad_values = None
        if ctx.needs_input_grad[1]:
            grad_logp = (dlogp * g_policy).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_values = (dvalues * g_value).to(ctx.dtypes[1])
        return None, grad_logp, grad_values, None, None, None, None, None, None, None
