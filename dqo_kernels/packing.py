"""Packed sequences: several sequences in one row, their boundaries given explicitly.

A packed batch lays its sequences end to end over the positions of a ``[B, T]`` tensor read in
row-major order (flash-attn's and flash-linear-attention's convention is ``B = 1``), and
``cu_seqlens`` (``[S + 1]`` integers, ``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[-1] =
B * T``) marks where each begins: sequence ``s`` holds the flat positions
``cu_seqlens[s] <= p < cu_seqlens[s + 1]``. Padding at the end of a packed row is one more
sequence with no action.

The DQO recurrences (the lambda-return, the cumulative importance ratio and the target-gradient
trace, docs/math.md §3) run backwards and forwards along a sequence, so they must stop at its
boundaries: the state after a sequence's last action is terminal (or ``bootstrap[s]``), and the
first action of the next sequence starts a fresh importance ratio. :func:`unpack` lays the
per-token inputs out as ``[S, L]`` rows (one sequence a row, ``L`` the longest), every backend
runs on those, and :func:`pack` puts the per-token outputs back. The loss's tensors are
per-token scalars, so the copy costs ``S * L`` elements: kilobytes beside the model's
activations, and it gives every backend packed sequences with the values and gradients of the
padded batch by construction.
"""
from __future__ import annotations

from typing import Sequence

import torch


def check_cu_seqlens(cu_seqlens, numel: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` as an int64 tensor on ``device``, or a ValueError naming what is wrong."""
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [S + 1] with S >= 1, got shape "
                         f"{tuple(cu.shape)}")
    if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
        raise ValueError(f"cu_seqlens: expected an integer tensor, got {cu.dtype}")
    cu = cu.to(device=device, dtype=torch.int64)
    # one host read: the boundaries decide the shapes below
    first, last, min_len = (int(v) for v in torch.stack(
        [cu[0], cu[-1], (cu[1:] - cu[:-1]).min()]).tolist())
    if first != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] = 0, got {first}")
    if last != numel:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] = {numel} (the positions of the "
                         f"packed tensors), got {last}")
    if min_len < 0:
        raise ValueError("cu_seqlens: expected non-decreasing boundaries, got a sequence of "
                         f"length {min_len}")
    return cu


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens[1:] - cu_seqlens[:-1]


def _layout(cu_seqlens: torch.Tensor):
    """Flat source index ``[S, L]`` of every unpacked slot, and which slots hold a position."""
    lengths = seq_lengths(cu_seqlens)
    L = max(int(lengths.max()), 1)
    offsets = torch.arange(L, device=cu_seqlens.device)
    valid = offsets[None, :] < lengths[:, None]
    index = (cu_seqlens[:-1, None] + offsets[None, :]).masked_fill(~valid, 0)
    return index, valid


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, fill=0) -> torch.Tensor:
    """``[S, L]``: row ``s`` holds sequence ``s`` of the packed ``x`` (any shape, read flat in
    row-major order), then ``fill``. Differentiable: the gradient flows back to ``x``'s
    positions."""
    index, valid = _layout(cu_seqlens)
    flat = x.reshape(-1)
    if flat.numel() == 0:  # all sequences empty: nothing to gather
        return torch.full(index.shape, fill, dtype=x.dtype, device=x.device)
    return flat[index].masked_fill(~valid, fill)


def pack(y: torch.Tensor, cu_seqlens: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`unpack`: the valid slots of ``[S, L]`` back into ``shape``."""
    _, valid = _layout(cu_seqlens)
    return y[valid].reshape(shape)  # sequences are contiguous and in order: row-major slots


def position_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[1, N]`` positions restarting at 0 at every sequence: what a causal LM takes with a
    packed row. transformers builds the block-diagonal attention from them when it gets no
    attention mask and no KV cache (pass ``use_cache=False``: with a cache it silently attends
    across sequences); flash-attn's varlen path takes the ``cu_seqlens``."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    lengths = seq_lengths(cu)
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return (torch.arange(int(cu[-1]), device=cu.device) - starts)[None]


def cu_seqlens_from_lengths(lengths: Sequence[int], device=None) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` as int32, flash-attn's dtype."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
