"""Chunked PyTorch versions of the two log-prob launchers in :mod:`.logprobs_triton`, with the
same signatures: the CPU path and the fallback. Rows are processed in chunks so that no
temporary larger than ~``CHUNK_BYTES`` is alive at a time. Computes in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 2**20


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_chunks(N: int, V: int):
    rows = max(1, CHUNK_BYTES // max(1, 4 * V))
    for start in range(0, N, rows):
        yield slice(start, min(N, start + rows))


def _local_targets(targets: torch.Tensor, v0: int, V: int):
    y = targets.long() - v0
    inside = (y >= 0) & (y < V)
    return y.clamp(0, max(V - 1, 0)), inside


def lse_forward(logits, targets, v0: int, inv_temp: float, want_ez: bool):
    N, V = logits.shape
    acc = _acc(logits)
    lse = torch.empty(N, dtype=acc, device=logits.device)
    zt = torch.empty_like(lse)
    ez = torch.empty_like(lse) if want_ez else None
    for c in _row_chunks(N, V):
        z = logits[c].to(acc) * inv_temp
        lse[c] = torch.logsumexp(z, dim=-1)
        y, inside = _local_targets(targets[c], v0, V)
        zt[c] = torch.where(inside, z.gather(1, y[:, None])[:, 0], 0.0)
        if want_ez:
            p = torch.exp(z - lse[c, None])
            ez[c] = torch.where(p > 0, p * z, 0.0).sum(-1)
    return lse, zt, ez


def logits_grad(logits, targets, lse, grad, v0: int, inv_temp: float, out,
                grad_ent=None, entropy=None):
    N, V = logits.shape
    acc = _acc(logits)
    for c in _row_chunks(N, V):
        z = logits[c].to(acc) * inv_temp
        p = torch.exp(z - lse[c, None].to(acc))
        g = grad[c, None].to(acc)
        d = -g * p
        y, inside = _local_targets(targets[c], v0, V)
        d.scatter_add_(1, y[:, None], torch.where(inside, grad[c].to(acc), 0.0)[:, None])
        if grad_ent is not None:
            shift = z - lse[c, None] + entropy[c, None]
            d -= grad_ent[c, None].to(acc) * torch.where(p > 0, p * shift, 0.0)
        out[c] = (d * inv_temp).to(out.dtype)
    return out
