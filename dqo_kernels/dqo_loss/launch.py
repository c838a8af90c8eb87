"""The one launcher signature of the DQO loss backends.

Every backend module (:mod:`.naive`, :mod:`.triton`, :mod:`.cpp`) has a ``dqo_loss_forward``::

    dqo_loss_forward(logp, ref_logp, values, rewards, mask, behavior_logp, bootstrap,
                     row_scale, hyper, data_checks=None) -> LaunchOutput

- the tensors as :func:`dqo_kernels.fused_dqo_loss` takes them (``[B, T]``, any float dtype
  and strides; ``mask`` bool; ``behavior_logp`` and ``bootstrap`` may be None), ``logp`` and
  ``values`` detached;
- ``row_scale``: the per-row factors ``a_b`` of the aggregation (:class:`.aggregation.RowScale`:
  a backend that can derive them from the mask itself may read its ``loss_agg`` and
  ``num_tokens`` instead of building the tensor);
- ``hyper``: :class:`DQOHyper`;
- ``data_checks``: the call's data checks (a function that raises what is wrong), or None. A
  backend runs them before it reads the data, or, if it looks for bad inputs in its own passes
  (the native kernel), only where it found some.

It returns per-row losses and the closed-form gradients of their sum, computed in the same
pass; :mod:`.autograd` turns them into the losses' autograd nodes. A new backend is a module
with this function.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch


class DQOHyper(NamedTuple):
    """The hyper-parameters of a DQO loss call, checked (see :func:`fused_dqo_loss`)."""

    beta: float = 0.1
    lam: float = 1.0
    gamma: float = 1.0
    is_clip: float = 1.0
    is_policy: bool = True
    is_value: bool = True
    target_grad: bool = False


class LaunchOutput(NamedTuple):
    """What every launcher returns, in the compute dtype (fp64 if an input is fp64, else fp32;
    the gradients may also come in ``logp``'s and ``values``' dtypes)."""

    policy_rows: torch.Tensor  # [B] sum_t a_b w_pi 0.5 delta^2
    value_rows: torch.Tensor  # [B] sum_t a_b w_V 0.5 (V - G)^2
    returns: torch.Tensor  # [B, T] G_t, 0 off the mask
    weights: torch.Tensor  # [B, T] truncated importance weights w_t, 0 off the mask
    td_error: torch.Tensor  # [B, T] delta_t = V_t - G_t, 0 off the mask
    # [B, T] d(sum of policy_rows) / dlogp and d(sum of value_rows) / dvalues; None only
    # under torch.inference_mode(), where no backward can ask for them
    dlogp: Optional[torch.Tensor]
    dvalues: Optional[torch.Tensor]
    # the sums of the rows where the backend computed them itself (the native kernel: in row
    # order, in double; the definition: over [B, T] at once); None: policy_rows.sum() and
    # value_rows.sum()
    policy_loss: Optional[torch.Tensor] = None
    value_loss: Optional[torch.Tensor] = None


class DQOScanResult(NamedTuple):
    """The losses and diagnostics of a call (losses already aggregated): what
    :func:`dqo_kernels.dqo_scan_reference` and the autograd wiring return."""

    policy_loss: torch.Tensor  # scalar, gradient to logp
    value_loss: torch.Tensor  # scalar, gradient to values
    returns: torch.Tensor  # [B, T] G_t, 0 off the mask
    weights: torch.Tensor  # [B, T] truncated importance weights w_t, 0 off the mask
    td_error: torch.Tensor  # [B, T] delta_t = V_t - G_t, 0 off the mask


Launcher = Callable[..., LaunchOutput]
