"""The two log-prob launchers of :mod:`.logprobs_triton` as native CPU kernels
(``csrc/logprobs.cpp``), with the same signatures and the same math; built and loaded by
:mod:`.native`. Rows run in parallel, each in vectorised passes over its vocabulary slice."""
from __future__ import annotations

import torch

from .native import load_extension


def lse_forward(logits: torch.Tensor, targets: torch.Tensor, v0: int, inv_temp: float,
                want_ez: bool):
    lse, zt, ez = load_extension().lse_forward(logits, targets, int(v0), float(inv_temp),
                                               bool(want_ez))
    return lse, zt, (ez if want_ez else None)


def logits_grad(logits, targets, lse, grad, v0: int, inv_temp: float, out, grad_ent=None,
                entropy=None):
    """``out`` may be ``logits`` (in-place backward), or any [N, V] buffer of the logits' dtype
    or of the compute dtype."""
    return load_extension().logits_grad(logits, targets, lse, grad, int(v0), float(inv_temp),
                                        out, grad_ent, entropy)
