"""``loss_head``: hidden states -> log-probs -> DQO loss -> backward, ours
(:func:`dqo_kernels.linear_logprobs` then :func:`dqo_kernels.fused_dqo_loss`) vs eager."""
from __future__ import annotations

from typing import Dict, List

from dqo_kernels import fused_dqo_loss, linear_logprobs

from .dqo_loss import dqo_inputs
from .logprobs import eager_linear_logprobs, linear_inputs
from .logprobs import needed_bytes as logprobs_needed_bytes

OPS = ("loss_head",)


def head_step(x, impl, B, T):
    h = x["hidden"].clone().requires_grad_(True)
    w = x["weight"].clone().requires_grad_(True)
    d = dqo_inputs(B, T, h.device)
    values = d["values"].clone().requires_grad_(True)
    targets = x["targets"].view(B, T).masked_fill(~d["mask"], -100)

    def step():
        h.grad = w.grad = values.grad = None
        if impl == "ours":
            logp = linear_logprobs(h.view(B, T, -1), w, targets)
            backend = None
        else:
            logp = eager_linear_logprobs(h, w, targets.clamp_min(0).view(-1)).view(B, T)
            backend = "torch"
        out = fused_dqo_loss(logp, d["ref_logp"], values, d["rewards"], d["mask"], lam=0.95,
                             backend=backend)
        out.loss.backward()
    return step


def jobs(op, model, device, quick: bool) -> List[Dict]:
    """The jobs for one entry of :func:`cases.logprobs.vocabs`."""
    gpu = device.type == "cuda"
    name, D, V, tokens_of = model
    out = []
    for N in tokens_of[op][:1] if quick else tokens_of[op]:
        B = max(1, N // 1024) if gpu else max(1, N // 256)
        out.append(dict(op=op, shape=[B, N // B, D, V], impls=["ours", "eager"], model=name))
    return out


def build(op, impl, shape, device, dtype):
    B, T, D, V = shape
    return head_step(linear_inputs(B * T, D, V, device, dtype), impl, B, T)


def _linear_shape(shape):
    return [shape[0] * shape[1], *shape[2:]]


def floor_bytes_flops(op, shape, elem):
    N, D, V = _linear_shape(shape)
    return (2 * V * D + 2 * N * D) * elem, 6 * N * D * V


def needed_bytes(op, impl, shape, elem) -> float:
    return logprobs_needed_bytes("linear_logprobs", impl, _linear_shape(shape), elem)


def tokens(op, shape) -> int:
    return shape[0] * shape[1]
