"""Per-token log-probs of the taken tokens: :func:`token_logprobs` from logits and
:func:`linear_logprobs` straight from the lm_head input, never holding ``[N, V]`` logits.

Both use one pair of launchers, Triton (:mod:`.triton`) on CUDA, native kernels (:mod:`.cpp`)
on CPU, or chunked PyTorch (:mod:`.chunked`, the backend ``"torch"``) anywhere: ``lse_forward``
(online logsumexp and target logit over a slice of vocabulary columns) and ``logits_grad``
(``g (onehot - softmax) / temperature`` of a slice, optionally in place). The definitions they
are tested against are in :mod:`.naive`.

``linear_logprobs`` walks the vocabulary in column chunks of the lm_head. Forward: logits of a
chunk ``h W_c^T`` -> chunk logsumexp, merged with ``logaddexp``; only ``lse`` ([N]) is saved.
Backward: recompute each chunk's logits, turn them into their gradient in place, then
``dh += dlogits_c W_c`` (accumulated in fp32, each product too: :func:`accumulate_mm`) and
``dW_c = dlogits_c^T h``. Each ``dW_c`` is one matmul over all N
tokens: accumulated in fp32 inside the GEMM and rounded once, with no fp32 copy of ``W``'s
gradient. Peak extra memory is one ``[N, chunk]`` logits buffer plus an fp32 ``[N, D]``
accumulator for ``dh`` (and, for half inputs off CUDA, fp32 copies of the chunk and of its
weight slice).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import (
    check_scalar,
    check_tensor,
    data_checks_enabled,
)
from .core import (
    LINEAR_CHUNK_BYTES,
    _backend_for,
    _backend_name,
    _check_targets,
    _empty,
    linear_backward,
    linear_forward,
)

__all__ = ["LinearLogprobsFunction", "TokenLogprobsFunction", "linear_logprobs",
           "token_logprobs"]


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temp, ignore_index, inplace_backward, return_entropy,
                impl):
        ignore = targets == ignore_index
        lse, zt, ez = impl.lse_forward(logits, targets, 0, inv_temp, return_entropy,
                                       ignore_index)
        logp = torch.where(ignore, 0.0, zt - lse)
        ent = torch.where(ignore, 0.0, lse - ez) if return_entropy else None
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.args = (inv_temp, ignore_index, inplace_backward, impl)
        if return_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        logits, targets, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, inplace_backward, impl = ctx.args
        ignore = targets == ignore_index
        g = torch.where(ignore, 0.0, grad_logp.to(lse.dtype)).contiguous()
        if grad_ent is not None:
            grad_ent = torch.where(ignore, 0.0, grad_ent.to(lse.dtype)).contiguous()
        out = logits if inplace_backward else _empty(impl, logits.shape, logits.dtype,
                                                     logits.device)
        impl.logits_grad(logits, targets, lse, g, 0, inv_temp, out, grad_ent=grad_ent,
                         entropy=ent if grad_ent is not None else None,
                         ignore_index=ignore_index)
        if inplace_backward:
            # The native and Triton kernels write through raw pointers, which autograd does not
            # see: bump the version so that any backward that saved this storage (the op that
            # produced the logits, or this one run again) raises instead of reading gradients.
            torch.autograd.graph.increment_version(logits)
        return out, None, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, inplace_backward: bool = False,
                   return_entropy: bool = False, backend: Optional[str] = None):
    """``log softmax(logits / temperature)[targets]`` per token, fp32, in one pass over V.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, fp32/fp16/bf16 (fp64 on the torch backend).
        targets: ``[N]`` or ``[B, T]`` token ids; ``ignore_index`` gives 0 and no gradient.
        temperature: the sampling temperature the log-probs are taken at (> 0).
        inplace_backward: write the gradient into ``logits``' memory (saves a ``[N, V]``
            buffer). After backward, ``logits`` and every tensor that shares its storage (the
            model output it is a view of, say) hold the gradient, not the logits; a backward
            that saved that storage raises (autograd's in-place check). Refused for logits
            whose rows overlap in memory (``expand()``, stride 0): their gradients would
            overwrite each other.
        return_entropy: also return the entropy of ``softmax(logits / temperature)``,
            differentiable.
        backend: None (Triton on CUDA, the native kernels on CPU, chunked PyTorch where
            neither is available), "triton", "cpp" or "torch".

    Returns:
        ``logp`` shaped like ``targets`` (and ``entropy`` if asked), fp32 (fp64 for fp64
        logits on the torch backend). Backward: ``g * (onehot - softmax) / temperature``.
    """
    check_tensor("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    check_tensor("targets", targets, shape=logits.shape[:-1], floating=False,
                 device=logits.device)
    temperature = check_scalar("temperature", temperature, low=0.0, low_open=True)
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits: expected a non-empty vocabulary dimension, got V = 0")
    _check_targets(targets, V, ignore_index)
    impl = _backend_for(backend, logits, "logits")
    flat = logits.reshape(-1, V)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    if inplace_backward and flat.shape[0] > 1 and flat.stride(0) < V:
        raise ValueError(
            f"inplace_backward: expected logits whose rows do not overlap in memory (the "
            f"gradient of each row is written over it), got shape {tuple(logits.shape)} with "
            f"strides {logits.stride()}, as from expand(); pass inplace_backward=False, or "
            "logits.contiguous()")
    out = TokenLogprobsFunction.apply(flat, targets.reshape(-1).contiguous(), 1.0 / temperature,
                                      int(ignore_index), bool(inplace_backward),
                                      bool(return_entropy), impl)
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, ignore_index, chunk, impl):
        logp, lse = linear_forward(hidden, weight, bias, targets, inv_temp, ignore_index,
                                   chunk, impl)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.args = (inv_temp, ignore_index, chunk, impl)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        inv_temp, ignore_index, chunk, impl = ctx.args
        grads = linear_backward(grad_logp, hidden, weight, bias, targets, lse, inv_temp,
                                ignore_index, chunk, impl, *ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                    ignore_index: int = -100, chunk_size: Optional[int] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``
    without materialising the ``[N, V]`` logits (the lm_head and the log-prob fused).

    Args:
        hidden: ``[N, D]`` or ``[B, T, D]`` lm_head inputs (the final hidden states).
        weight: ``[V, D]`` lm_head weight (``model.lm_head.weight``); ``bias``: ``[V]`` or None.
        targets: ``[N]`` / ``[B, T]`` token ids; ``ignore_index`` gives 0 and no gradient.
        chunk_size: vocabulary columns per chunk; default: a ~512 MiB (GPU) / 64 MiB (CPU)
            ``[N, chunk]`` buffer.
        backend: None (Triton on CUDA, the native kernels on CPU, chunked PyTorch where
            neither is available), "triton", "cpp" or "torch".

    Returns:
        fp32 log-probs shaped like ``targets`` (fp64 for fp64 inputs). Gradients reach
        ``hidden``, ``weight`` and ``bias`` and honour every token's upstream gradient.
    """
    check_tensor("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [N, D] or [B, T, D], got shape {tuple(hidden.shape)}")
    D = hidden.shape[-1]
    check_tensor("weight", weight, device=hidden.device)
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight: expected shape [V, {D}] (hidden's last dim), got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (hidden's), got {weight.dtype}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight: expected a non-empty vocabulary dimension, got V = 0")
    if bias is not None:
        check_tensor("bias", bias, shape=(V,), device=hidden.device)
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias: expected dtype {hidden.dtype} (hidden's), got {bias.dtype}")
    check_tensor("targets", targets, shape=hidden.shape[:-1], floating=False,
                 device=hidden.device)
    temperature = check_scalar("temperature", temperature, low=0.0, low_open=True)
    # under torch.compile the values are checked inside the custom op (a host read here
    # would break the graph)
    _check_targets(targets, V, ignore_index, data=not torch.compiler.is_compiling())
    impl = _backend_for(backend, hidden, "hidden")
    flat = hidden.reshape(-1, D)
    N = flat.shape[0]
    if chunk_size is None:
        budget = LINEAR_CHUNK_BYTES["cuda" if hidden.is_cuda else "cpu"]
        chunk_size = max(256, budget // max(1, N * hidden.element_size()) // 256 * 256)
    else:
        chunk_size = int(check_scalar("chunk_size", chunk_size, low=1.0, high_open=True))
    args = (1.0 / temperature, int(ignore_index), int(min(chunk_size, V)))
    if torch.compiler.is_compiling():
        # under torch.compile: a torch.library custom op with its autograd formula
        from .custom_op import linear_logprobs_op
        out = linear_logprobs_op(flat, weight, bias, targets.reshape(-1).contiguous(), *args,
                                 _backend_name(impl), data_checks_enabled())
    else:
        out = LinearLogprobsFunction.apply(flat, weight, bias,
                                           targets.reshape(-1).contiguous(), *args, impl)
    return out.view(targets.shape)
