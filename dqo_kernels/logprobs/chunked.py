"""Chunked PyTorch versions of the two log-prob launchers in :mod:`.triton`, with the same
signatures: the backend ``"torch"``, the fallback where neither kernel can run. Rows are
processed in chunks so that no temporary larger than ~``CHUNK_BYTES`` is alive at a time.
Computes in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch

from ..dtypes import acc_dtype

CHUNK_BYTES = 64 * 2**20


def _row_chunks(N: int, V: int):
    rows = max(1, CHUNK_BYTES // max(1, 4 * V))
    for start in range(0, N, rows):
        yield slice(start, min(N, start + rows))


def _local_targets(targets: torch.Tensor, v0: int, V: int):
    y = targets.long() - v0
    inside = (y >= 0) & (y < V)
    return y.clamp(0, max(V - 1, 0)), inside


def _scaled(x: torch.Tensor, inv_temp: float, acc: torch.dtype) -> torch.Tensor:
    z = x.to(acc)  # a view when x is already in acc
    return z * inv_temp if inv_temp != 1.0 else z


def lse_forward(logits, targets, v0: int, inv_temp: float, want_ez: bool,
                ignore_index: int = -100):
    # ignore_index: every row is computed here (the callers zero the ignored ones)
    N, V = logits.shape
    acc = acc_dtype(logits)
    lse = torch.empty(N, dtype=acc, device=logits.device)
    zt = torch.empty_like(lse)
    ez = torch.empty_like(lse) if want_ez else None
    for c in _row_chunks(N, V):
        z = _scaled(logits[c], inv_temp, acc)
        m = z.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)  # a row of -inf: keep exp() finite
        e = torch.sub(z, m).exp_()  # one temporary, reused in place
        s = e.sum(-1)
        lse[c] = m[:, 0] + s.log()
        y, inside = _local_targets(targets[c], v0, V)
        zt[c] = torch.where(inside, z.gather(1, y[:, None])[:, 0], 0.0)
        if want_ez:
            ez[c] = (e * torch.where(e > 0, z, 0.0)).sum(-1) / s
    return lse, zt, ez


def logits_grad(logits, targets, lse, grad, v0: int, inv_temp: float, out,
                grad_ent=None, entropy=None, ignore_index: int = -100):
    """``out`` may be ``logits`` (in-place backward): each chunk's gradient is then built
    directly in the logits' memory."""
    N, V = logits.shape
    acc = acc_dtype(logits)
    for c in _row_chunks(N, V):
        z = _scaled(logits[c], inv_temp, acc)
        direct = out.dtype == acc and out[c].is_contiguous()
        d = out[c] if direct else torch.empty_like(z)
        if grad_ent is not None:  # needs z, which d may overwrite
            shift = z - (lse[c] - entropy[c])[:, None].to(acc)
        torch.sub(z, lse[c, None].to(acc), out=d).exp_()  # d = softmax
        if grad_ent is not None:
            ent = d * torch.where(d > 0, shift, 0.0) * grad_ent[c, None].to(acc)
            d.mul_(-grad[c, None].to(acc)).sub_(ent)
        else:
            d.mul_(-grad[c, None].to(acc))
        y, inside = _local_targets(targets[c], v0, V)
        d.scatter_add_(1, y[:, None], torch.where(inside, grad[c].to(acc), 0.0)[:, None])
        if inv_temp != 1.0:
            d.mul_(inv_temp)
        if not direct:
            out[c] = d.to(out.dtype)
    return out
