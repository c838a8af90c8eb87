"""Random padded DQO batches with the layouts trainers produce, for the tests."""
from __future__ import annotations

import os
import zlib
from typing import Dict, Optional

import torch

LAYOUTS = ("right", "left", "interleaved", "bernoulli")
# Shift every seed to draw a different set of random batches: DQO_TEST_SEED=7 pytest ...
SEED_OFFSET = int(os.environ.get("DQO_TEST_SEED", "0"))


def stable_seed(*parts) -> int:
    """A seed that is the same in every process (unlike hash() of a str)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def make_mask(layout: str, B: int, T: int, g: torch.Generator, empty_row: bool) -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        if layout == "bernoulli":
            mask[b] = torch.rand(T, generator=g) < 0.6
            continue
        n = int(torch.randint(0, T + 1, (1,), generator=g))  # response length
        p = int(torch.randint(0, T - n + 1, (1,), generator=g))  # prompt (or left pad) length
        if layout == "right":  # prompt, response, right padding
            mask[b, p:p + n] = True
        elif layout == "left":  # left padding + prompt, response flush right
            mask[b, T - n:] = True
        elif layout == "interleaved":  # response with environment tokens (tool output) inside
            mask[b, p:p + n] = torch.rand(n, generator=g) < 0.7
        else:
            raise ValueError(layout)
    if empty_row and B > 1:
        mask[int(torch.randint(0, B, (1,), generator=g))] = False
    return mask


def make_batch(layout: str = "right", B: int = 5, T: int = 23, *, seed: int = 0,
               behavior: bool = True, bootstrap: bool = True, empty_row: bool = True,
               dense_rewards: bool = True, garbage: bool = True,
               noncontig: bool = False) -> Dict[str, Optional[torch.Tensor]]:
    """float64 CPU tensors; positions off the mask hold garbage (NaN, huge values) unless
    ``garbage`` is False, since pass-through positions must never be read."""
    g = torch.Generator().manual_seed(seed + SEED_OFFSET)
    mask = make_mask(layout, B, T, g, empty_row)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    logp = -3.0 * rand(B, T)
    # log-probs, so <= 0 (the data checks refuse positive ones): reflected where the noise
    # pushes them above 0
    ref = -(logp + 0.3 * randn(B, T)).abs()
    beh = -(logp + 0.3 * randn(B, T)).abs() if behavior else None
    values = 0.5 * randn(B, T)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):  # outcome reward on the last action, process rewards on some others
        idx = torch.nonzero(mask[b]).flatten()
        if len(idx):
            rewards[b, idx[-1]] = float(rand(1) < 0.5)
            if dense_rewards:
                step = idx[rand(len(idx)) < 0.2]
                rewards[b, step] += 0.5 * randn(len(step))
    if garbage:
        off = ~mask
        logp = logp.masked_fill(off, float("nan"))
        values = values.masked_fill(off, 1e30)
        ref = ref.masked_fill(off, -float("inf"))
        if beh is not None:
            beh = beh.masked_fill(off, float("nan"))
    out = dict(logp=logp, ref_logp=ref, values=values, rewards=rewards, mask=mask,
               behavior_logp=beh, bootstrap=randn(B) if bootstrap else None)
    if noncontig:  # every [B, T] tensor a strided view, as logits[:, :-1]-derived tensors are
        for k, x in out.items():
            if x is not None and x.dim() == 2:
                wide = torch.zeros(T, 2 * B, dtype=x.dtype)
                wide[:, ::2] = x.t()
                out[k] = wide.t()[::2]
                assert not out[k].is_contiguous()
    return out


def to(batch, dtype=None, device=None, grad=True):
    """Copy a batch to ``dtype``/``device``; logp and values become leaves requiring grad.
    Strides are preserved (``torch.empty_strided`` + copy) so non-contiguous stays so."""
    out = {}
    for k, x in batch.items():
        if x is None:
            out[k] = None
            continue
        dt = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
        y = torch.empty_strided(x.shape, x.stride(), dtype=dt, device=device or x.device)
        y.copy_(x)
        if grad and k in ("logp", "values"):
            y.requires_grad_(True)
        out[k] = y
    return out
