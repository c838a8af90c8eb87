"""``dqo_loss``: :func:`dqo_kernels.fused_dqo_loss` forward + backward.

Ours (Triton on CUDA, the native kernel on CPU) vs ``torchrl`` (torchrl's vectorised
``vec_td_lambda_return_estimate`` for the lambda-returns, then the IS-weighted losses in eager
torch: the strongest thing a user would otherwise write) vs ``eager`` (the PyTorch reference: a
Python loop over T with autograd, the shape of verl's ``compute_gae_advantage_return``) vs
``compile`` (torch.compile of it, GPU, short T only).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from dqo_kernels import fused_dqo_loss

OPS = ("dqo_loss",)


def dqo_inputs(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, T // 4 + 1, (B,), generator=g)
    length = torch.randint(max(1, T // 4), T - T // 4 + 1, (B,), generator=g)
    pos = torch.arange(T)
    mask = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    logp = -torch.rand(B, T, generator=g) * 3
    # log-probs are <= 0 (the loss's data checks refuse positive ones)
    out = dict(logp=logp, ref_logp=(logp + 0.1 * torch.randn(B, T, generator=g)).clamp(max=0),
               values=0.5 * torch.randn(B, T, generator=g), mask=mask)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), (prompt + length - 1).clamp(0, T - 1)] = 1.0
    out["rewards"] = rewards * mask
    return {k: v.to(device) for k, v in out.items()}


def dqo_step(x, backend):
    logp = x["logp"].clone().requires_grad_(True)
    values = x["values"].clone().requires_grad_(True)

    def step():
        logp.grad = values.grad = None
        out = fused_dqo_loss(logp, x["ref_logp"], values, x["rewards"], x["mask"], lam=0.95,
                             backend=backend)
        out.loss.backward()
    return step


def torchrl_dqo_step(x, beta=0.1, lam=0.95, gamma=1.0, is_clip=1.0):
    """The DQO loss as a user would write it with torchrl: its vectorised TD(lambda) for the
    returns of the soft rewards, then the truncated-IS-weighted losses in eager torch
    (token-mean). Exact for rows whose actions are contiguous, as the benchmark's are."""
    from torchrl.objectives.value.functional import vec_td_lambda_return_estimate

    logp = x["logp"].clone().requires_grad_(True)
    values = x["values"].clone().requires_grad_(True)
    ref, rewards, mask = x["ref_logp"], x["rewards"], x["mask"]
    m = mask.float()
    T = mask.shape[1]
    last = T - 1 - mask.flip(-1).float().argmax(-1)
    done = torch.zeros_like(mask)
    done[torch.arange(mask.shape[0]), last] = True
    log_c = math.log(is_clip)

    def step():
        logp.grad = values.grad = None
        l_t = logp - ref
        soft = (rewards - beta * l_t.detach()) * m
        next_v = torch.cat([values.detach()[:, 1:], torch.zeros_like(values[:, :1])], 1)
        g = vec_td_lambda_return_estimate(gamma, lam, next_v[..., None], soft[..., None],
                                          done[..., None], done[..., None])[..., 0]
        c = torch.cumsum((logp.detach() - ref) * m, -1)
        w = torch.exp(torch.clamp(c, max=log_c)) * m
        n = m.sum()
        delta = beta * l_t + values.detach() - (g + beta * l_t.detach())
        loss = (0.5 * w * delta ** 2).sum() / n + (0.5 * w * (values - g) ** 2).sum() / n
        loss.backward()
    return step


def jobs(device, quick: bool) -> List[Dict]:
    gpu = device.type == "cuda"
    shapes = ([(2, 512), (8, 512), (16, 2048), (32, 2048), (8, 8192), (2, 32768)] if gpu
              else [(8, 256), (16, 1024), (64, 1024), (16, 4096), (2, 32768)])
    out = []
    for s in shapes[:2] if quick else shapes:
        impls = ["ours", "torchrl", "eager"] + (["compile"] if gpu and s[1] <= 512 else [])
        out.append(dict(op="dqo_loss", shape=list(s), impls=impls))
    return out


def build(op, impl, shape, device, dtype):
    x = dqo_inputs(*shape, device)
    if impl == "torchrl":
        return torchrl_dqo_step(x)
    backend = {"ours": None, "eager": "torch"}.get(impl, "torch")
    step = dqo_step(x, backend)
    return torch.compile(step) if impl == "compile" else step


def floor_bytes_flops(op, shape, elem):
    B, T = shape
    # read logp, ref, values, rewards, mask; write returns, weights, td, 2 grads
    return B * T * (4 * 4 + 1 + 5 * 4), 0.0


def needed_bytes(op, impl, shape, elem) -> float:
    return 0.0


def tokens(op, shape) -> int:
    return shape[0] * shape[1]
