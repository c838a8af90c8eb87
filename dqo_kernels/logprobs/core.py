"""The machinery behind :func:`dqo_kernels.linear_logprobs` and
:func:`dqo_kernels.token_logprobs`: backend choice, target checks, and the chunked
lm_head forward and backward, shared by the eager autograd Functions (the package) and
the ``torch.library`` custom ops (:mod:`.custom_op`)."""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Tuple

import torch

from ..backends import resolve_backend
from ..dtypes import acc_dtype
from ..validation import (
    check_pending,
    check_token_ids,
    data_checks_enabled,
    defer_checks,
    run_checks,
)
from . import chunked

# Bytes of one [N, chunk] logits buffer in linear_logprobs (the chunk width is derived from it).
LINEAR_CHUNK_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}


def _impl(backend: Optional[str], device: torch.device) -> ModuleType:
    """The module of the backend that runs on ``device``; each has ``lse_forward`` and
    ``logits_grad`` (and, for large CPU buffers, ``empty``)."""
    name = resolve_backend(backend, device)
    if name == "triton":
        from . import triton
        return triton
    if name == "cpp":
        from . import cpp
        return cpp
    return chunked


def _backend_name(impl: ModuleType) -> str:
    """The backend name of an implementation module (:func:`_impl` inverted)."""
    name = impl.__name__.rsplit(".", 1)[1]
    return "torch" if name == "chunked" else name


def _backend_for(backend: Optional[str], x: torch.Tensor, name: str):
    impl = _impl(backend, x.device)
    if impl.__name__ == f"{__name__}.triton" and x.dtype == torch.float64:
        raise ValueError(f"{name}: the triton backend takes fp32/fp16/bf16, got float64; "
                         "use backend='cpp' or 'torch' for float64")
    return impl


def _check_targets(targets: torch.Tensor, V: int, ignore_index: int, data: bool = True) -> None:
    """The targets' dtype; with ``data`` (and the data checks on), their values: read now, or
    on CUDA deferred (flags kept on the device, read by :func:`dqo_kernels.check_pending` or
    the next call; the kernels never index with an out-of-range target meanwhile)."""
    check_token_ids("targets", targets)
    if data and data_checks_enabled():
        bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)

        def report():
            idx = tuple(torch.nonzero(bad)[0].tolist())
            raise ValueError(f"targets: expected ids in [0, {V}) or ignore_index={ignore_index}, "
                             f"got {targets[idx].item()} at index {idx}")
        if defer_checks(targets.device):
            check_pending(wait=False)  # past calls' flags that reached the host
            run_checks([(bad.any(), report)], defer=True)
        elif bool(bad.any()):
            report()



def linear_forward(hidden, weight, bias, targets, inv_temp: float, ignore_index: int,
                   chunk: int, impl) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logp, lse) of :func:`linear_logprobs`, vocabulary chunk by chunk."""
    V = weight.shape[0]
    lse = None
    zt = None
    buf = _chunk_buffer(impl, hidden, chunk)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        logits = _chunk_logits(hidden, weight, bias, v0, v1, buf)
        lse_c, zt_c, _ = impl.lse_forward(logits, targets, v0, inv_temp, False, ignore_index)
        lse = lse_c if lse is None else torch.logaddexp(lse, lse_c)
        zt = zt_c if zt is None else zt + zt_c
    ignore = targets == ignore_index
    return torch.where(ignore, 0.0, zt - lse), lse


def linear_backward(grad_logp, hidden, weight, bias, targets, lse, inv_temp: float,
                    ignore_index: int, chunk: int, impl, need_h: bool, need_w: bool,
                    need_b: bool):
    """(d_hidden, d_weight, d_bias) of :func:`linear_logprobs` (None where not needed)."""
    V = weight.shape[0]
    g = torch.where(targets == ignore_index, 0.0, grad_logp.to(lse.dtype)).contiguous()
    acc = acc_dtype(hidden)
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    d_weight = torch.empty_like(weight) if need_w else None
    d_bias = torch.empty(V, dtype=bias.dtype, device=bias.device) if need_b else None
    buf = _chunk_buffer(impl, hidden, chunk)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        logits = _chunk_logits(hidden, weight, bias, v0, v1, buf)
        d_logits = impl.logits_grad(logits, targets, lse, g, v0, inv_temp, out=logits,
                                    ignore_index=ignore_index)
        if need_h:
            accumulate_mm(d_hidden, d_logits, weight[v0:v1])
        if need_w:
            torch.mm(d_logits.T, hidden, out=d_weight[v0:v1])
        if need_b:
            d_bias[v0:v1] = torch.sum(d_logits, dim=0, dtype=acc)
    return d_hidden.to(hidden.dtype) if need_h else None, d_weight, d_bias



def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with the product accumulated in ``acc``'s dtype (fp32 for half ``a``
    and ``b``), never rounded to the half dtype first: each chunk's ``d_hidden`` product in
    bf16 would lose ~3 digits before the sum over chunks.

    CUDA: the GEMM writes fp32 directly (``torch.mm(..., out_dtype=torch.float32)``, aten
    ``mm.dtype``: half inputs, fp32 accumulation and output), then one fp32 add. (Not
    ``addmm(acc, ..., out_dtype=)``: some torch versions require its ``self`` in the inputs'
    half dtype.) Elsewhere (CPU has no such kernel) the chunk and the weight slice are upcast,
    an fp32 copy of each."""
    if a.dtype == acc.dtype:
        acc += a @ b
    elif acc.device.type in ("cuda", "meta") and "dtype" in torch.ops.aten.mm.overloads():
        acc += torch.mm(a, b, out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _empty(impl, shape, dtype, device) -> torch.Tensor:
    """A large scratch buffer: on CPU the native ops hand out huge-page memory, whose first
    touch costs far fewer page faults (see csrc/logprobs.cpp)."""
    make = getattr(impl, "empty", None)
    return make(shape, dtype) if make is not None else torch.empty(shape, dtype=dtype,
                                                                     device=device)


def _chunk_buffer(impl, hidden, chunk: int) -> torch.Tensor:
    """The flat scratch buffer of one ``[N, chunk]`` logits chunk (``chunk <= V``)."""
    return _empty(impl, (hidden.shape[0] * chunk,), hidden.dtype, hidden.device)


def _chunk_logits(hidden, weight, bias, v0, v1, buf):
    """Logits of vocabulary columns [v0, v1) written into ``buf``, one scratch buffer reused
    by every chunk (a fresh one per chunk pays its page faults again on CPU)."""
    out = buf[:hidden.shape[0] * (v1 - v0)].view(hidden.shape[0], v1 - v0)
    if bias is None:
        return torch.mm(hidden, weight[v0:v1].T, out=out)
    return torch.addmm(bias[v0:v1], hidden, weight[v0:v1].T, out=out)


