"""One module per benchmarked op: its inputs, its implementations (ours and the peers'), its
shapes, its roofline floor and its memory need. Each module has ``OPS`` and, for each of them,
``build(op, impl, shape, device, dtype)`` (a zero-argument step: forward + backward),
``floor_bytes_flops(op, shape, elem)``, ``needed_bytes(op, impl, shape, elem)`` and
``tokens(op, shape)``; this package dispatches on the op and makes the plan."""
from __future__ import annotations

from typing import Dict, List

from . import dqo_loss, logprobs, loss_head

OPS = ("dqo_loss", "token_logprobs", "linear_logprobs", "loss_head")
MODULES = {op: m for m in (dqo_loss, logprobs, loss_head) for op in m.OPS}


def plan(device, quick: bool, ops) -> List[Dict]:
    """The jobs of ``ops`` for this device: ``dict(op, shape, impls[, model])`` each."""
    jobs = dqo_loss.jobs(device, quick) if "dqo_loss" in ops else []
    models = logprobs.vocabs(device.type == "cuda")
    for model in models[:1] if quick else models:
        for op in ("token_logprobs", "linear_logprobs", "loss_head"):
            if op in ops:
                jobs += MODULES[op].jobs(op, model, device, quick)
    return jobs


def build(op, impl, shape, device, dtype):
    return MODULES[op].build(op, impl, shape, device, dtype)


def floor_bytes_flops(op, shape, elem):
    """(bytes moved, matmul flops) that no implementation of ``op`` can avoid."""
    return MODULES[op].floor_bytes_flops(op, shape, elem)


def needed_bytes(op, impl, shape, elem) -> float:
    return MODULES[op].needed_bytes(op, impl, shape, elem)


def tokens(op, shape) -> int:
    return MODULES[op].tokens(op, shape)
