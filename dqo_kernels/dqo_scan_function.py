"""Autograd wiring of the kernel backends of the fused DQO loss.

The kernels produce the closed-form gradients of SPEC 3.7/3.8 in the same pass as the forward
(``dL_pi/dlogp`` and ``dL_V/dvalues``), so each loss becomes its own autograd node whose
backward is a scale of a gradient already computed: no second pass over the data. The two nodes
are independent, so ``policy_loss.backward()`` and ``value_loss.backward()`` can be called
separately (one DeepSpeed engine per model) without ``retain_graph``. (One node with both
inputs would not do: a backward of the policy loss alone would run the value model's nodes
with empty gradients and free their saved tensors.)

Backward hands each gradient buffer over to autograd (which keeps it as ``.grad`` without a
copy) and forgets it, so ``loss.backward()`` costs no ``[B, T]`` copy. A second backward
through the same node (``retain_graph=True``) recomputes the gradients from the inputs, after
checking that none was changed in place.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from .dqo_scan_reference import DQOScanResult

# A row launcher maps the prepared inputs and the row scale to
# (policy_rows [B], value_rows [B], returns, weights, td_error, dlogp, dvalues).
Launcher = Callable[..., Tuple[torch.Tensor, ...]]
# A loss launcher takes no argument and returns
# (policy_loss [], value_loss [], returns, weights, td_error, dlogp, dvalues).
LossLauncher = Callable[[], Tuple[torch.Tensor, ...]]


def _scaled(grad: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # loss.backward() passes g = 1: on CPU (where reading it costs no sync) hand the buffer
    # over as it is, instead of a [B, T] multiply into new memory (a fixed cost of every call)
    if not (g.device.type == "cpu" and g.numel() == 1 and float(g) == 1.0):
        grad = grad * g
    return grad if grad.dtype == dtype else grad.to(dtype)


class _Gradients:
    """The gradients of one call, shared by its two nodes: each is handed out once, then
    recomputed by ``launch`` if asked for again."""

    def __init__(self, launch: LossLauncher, inputs: Tuple, grads):
        self.launch, self.inputs, self.grads = launch, inputs, list(grads)
        self.versions = [None if x is None else x._version for x in inputs]

    def take(self, i: int) -> torch.Tensor:
        if self.grads[i] is None:
            self._recompute()
        grad, self.grads[i] = self.grads[i], None  # autograd may keep it as .grad
        return grad

    def _recompute(self) -> None:
        for x, version in zip(self.inputs, self.versions):
            if x is not None and x._version != version:
                raise RuntimeError(
                    "fused_dqo_loss: an input of the loss was modified in place after the "
                    "forward (a second backward through the same graph needs it unchanged); "
                    "compute the loss again instead")
        with torch.no_grad():
            grads = self.launch()[-2:]
        self.grads = [g if g is not None else new for g, new in zip(self.grads, grads)]


class PrecomputedGradLoss(torch.autograd.Function):
    """``loss`` as a function of ``x`` whose gradient ``dloss/dx`` is ``grads.take(i)``."""

    @staticmethod
    def forward(ctx, x, loss, grads: _Gradients, i: int):
        ctx.grads, ctx.i, ctx.x_dtype = grads, i, x.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        return _scaled(ctx.grads.take(ctx.i), g, ctx.x_dtype), None, None, None


def closed_form(launch: LossLauncher, logp: torch.Tensor, values: torch.Tensor,
                inputs: Tuple = ()) -> Tuple[torch.Tensor, DQOScanResult]:
    """``(loss, result)`` of a loss launcher, differentiable in ``logp`` and ``values``;
    ``inputs``: the other tensors it reads."""
    with torch.no_grad():
        policy, value, returns, weights, td, dlogp, dvalues = launch()
    if torch.is_grad_enabled() and (logp.requires_grad or values.requires_grad):
        grads = _Gradients(launch, (logp, values, *inputs), (dlogp, dvalues))
        if logp.requires_grad:
            policy = PrecomputedGradLoss.apply(logp, policy, grads, 0)
        if values.requires_grad:
            value = PrecomputedGradLoss.apply(values, value, grads, 1)
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
