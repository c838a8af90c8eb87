""":func:`dqo_kernels.linear_logprobs` as ``torch.library`` custom ops, the path it takes
under ``torch.compile`` (``fullgraph=True`` included): the chunk loop and its kernels run
inside opaque ops with fake (meta) implementations, the backward is their registered
autograd formula. Eager calls keep :class:`LinearLogprobsFunction` (the same
:func:`linear_forward` / :func:`linear_backward` code, so the same values)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends import resolve_backend
from .core import _check_targets, _impl, linear_backward, linear_forward

__all__ = ["linear_logprobs_op"]


@torch.library.custom_op("dqo_kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], targets: torch.Tensor, inv_temp: float,
                        ignore_index: int, chunk: int, backend: str,
                        checks: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if checks:
        _check_targets(targets, weight.shape[0], ignore_index)
    impl = _impl(resolve_backend(backend, hidden.device), hidden.device)
    return linear_forward(hidden, weight, bias, targets, inv_temp, ignore_index, chunk, impl)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, targets, inv_temp, ignore_index, chunk, backend, checks):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=dtype), hidden.new_empty((n,), dtype=dtype)


@torch.library.custom_op("dqo_kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], targets: torch.Tensor, lse: torch.Tensor,
                        inv_temp: float, ignore_index: int, chunk: int, backend: str,
                        need_h: bool, need_w: bool, need_b: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(resolve_backend(backend, hidden.device), hidden.device)
    dh, dw, db = linear_backward(grad_logp, hidden, weight, bias, targets, lse, inv_temp,
                                 ignore_index, chunk, impl, need_h, need_w, need_b)
    # an op returns tensors: an empty one stands for "not needed"
    empty = hidden.new_empty((0,))
    return (empty if dh is None else dh, empty.clone() if dw is None else dw,
            empty.clone() if db is None else db)


@linear_logprobs_bwd.register_fake
def _(grad_logp, hidden, weight, bias, targets, lse, inv_temp, ignore_index, chunk, backend,
      need_h, need_w, need_b):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty((0,)),
            torch.empty_like(weight) if need_w else hidden.new_empty((0,)),
            torch.empty_like(bias) if need_b else hidden.new_empty((0,)))


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temp, ignore_index, chunk, backend, _ = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.args = (inv_temp, ignore_index, chunk, backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_logp, grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b) and ctx.has_bias
    dh, dw, db = linear_logprobs_bwd(grad_logp, hidden, weight, bias, targets, lse, *ctx.args,
                                     bool(need_h), bool(need_w), need_b)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None,
            None, None, None, None, None, None)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup)


def linear_logprobs_op(hidden, weight, bias, targets, inv_temp: float, ignore_index: int,
                       chunk: int, backend: str, checks: bool) -> torch.Tensor:
    """The log-probs (the forward op's first output; its second, ``lse``, is saved)."""
    return linear_logprobs_fwd(hidden, weight, bias, targets, inv_temp, ignore_index, chunk,
                               backend, checks)[0]
