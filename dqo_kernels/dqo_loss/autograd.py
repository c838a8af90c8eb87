"""Autograd wiring of the backends of the fused DQO loss: one for all of them.

Every launcher (:mod:`.launch`) produces the closed-form gradients of docs/math.md §3.7/3.8 in
the same pass as the forward (``dL_pi/dlogp`` and ``dL_V/dvalues``; the definition,
:mod:`.naive`, by autograd), so each loss becomes its own autograd node whose backward is a
scale of a gradient already computed: no second pass over the data. The two nodes are
independent, so ``policy_loss.backward()`` and ``value_loss.backward()`` can be called
separately (one DeepSpeed engine per model) without ``retain_graph``. (One node with both
inputs would not do: a backward of the policy loss alone would run the value model's nodes
with empty gradients and free their saved tensors.)

Backward hands each gradient buffer over to autograd (which keeps it as ``.grad`` without a
copy) and forgets it, so ``loss.backward()`` costs no ``[B, T]`` copy. A second backward
through the same node (``retain_graph=True``) recomputes the gradients from the inputs, after
checking that none was changed in place.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .aggregation import RowScale
from .launch import DQOHyper, DQOScanResult, Launcher

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
                inputs: Tuple = (), first: Optional[LossLauncher] = None
                ) -> Tuple[torch.Tensor, DQOScanResult]:
    """``(loss, result)`` of a loss launcher, differentiable in ``logp`` and ``values``;
    ``inputs``: the other tensors it reads; ``first``: the first launch, if not ``launch``
    (which then only recomputes the gradients)."""
    with torch.no_grad():
        policy, value, returns, weights, td, dlogp, dvalues = (first or launch)()
    if torch.is_grad_enabled() and (logp.requires_grad or values.requires_grad):
        grads = _Gradients(launch, (logp, values, *inputs), (dlogp, dvalues))
        if logp.requires_grad:
            policy = PrecomputedGradLoss.apply(logp, policy, grads, 0)
        if values.requires_grad:
            value = PrecomputedGradLoss.apply(values, value, grads, 1)
    return policy + value, DQOScanResult(policy, value, returns, weights, td)


def run_launcher(launcher: Launcher, logp: torch.Tensor, ref_logp: torch.Tensor,
                 values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                 behavior_logp: Optional[torch.Tensor], bootstrap: Optional[torch.Tensor],
                 row_scale: RowScale, hyper: DQOHyper,
                 data_checks: Optional[Callable[[], None]] = None
                 ) -> Tuple[torch.Tensor, DQOScanResult]:
    """``(loss, result)`` of a backend's launcher, differentiable in ``logp`` and ``values``.
    The arguments are the launcher's own; ``data_checks`` go to the first launch only (a
    recompute for a second backward checks instead that no input changed)."""
    def launch(checks=None):
        out = launcher(logp.detach(), ref_logp, values.detach(), rewards, mask, behavior_logp,
                       bootstrap, row_scale, hyper, checks)
        policy = out.policy_rows.sum() if out.policy_loss is None else out.policy_loss
        value = out.value_rows.sum() if out.value_loss is None else out.value_loss
        return policy, value, out.returns, out.weights, out.td_error, out.dlogp, out.dvalues

    inputs = (ref_logp, rewards, mask, behavior_logp, bootstrap, *row_scale.inputs)
    return closed_form(launch, logp, values, inputs, first=lambda: launch(data_checks))
