"""The two log-prob launchers of :mod:`.logprobs_triton` as native CPU kernels
(``csrc/logprobs.cpp``), with the same signatures and the same math; built and loaded by
:mod:`.native`. Rows run in parallel, each in vectorised passes over its vocabulary slice."""
from __future__ import annotations

import os

import torch

from .native import load_extension


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a large scratch or gradient buffer, advised onto
    transparent huge pages (sizes of 4 MiB and up). Its first write then takes 512x fewer page
    faults: 2.5x faster steady-state backward at N=1024, V=32000 (benchmarks/NOTES.md), after
    a few slower first calls while the kernel assembles huge pages.
    ``DQO_KERNELS_HUGEPAGES=0`` turns this off."""
    if os.environ.get("DQO_KERNELS_HUGEPAGES", "1") == "0":
        return torch.empty(tuple(shape), dtype=dtype)
    return load_extension().empty_huge([int(n) for n in shape], dtype)


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
