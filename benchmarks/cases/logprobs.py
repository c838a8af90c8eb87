"""``token_logprobs`` and ``linear_logprobs``: log-probs of the taken tokens, forward + backward.

- ``token_logprobs``: ours vs TRL's ``selective_log_softmax`` vs eager
  ``log_softmax(logits).gather`` vs its torch.compile, and flash-attn's Triton cross-entropy /
  Liger-Kernel's cross-entropy where installed (GPU).
- ``linear_logprobs``: ours vs Cut Cross-Entropy (``impl="torch_compile"`` on CPU, its Triton
  kernel on GPU) vs eager (``h @ W.T`` then log_softmax) vs its torch.compile, and
  Liger-Kernel's fused linear cross-entropy (GPU).

``VOCABS`` are the models (hidden size, vocabulary, token counts) these and ``loss_head`` run.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from peers import installed

from dqo_kernels import linear_logprobs, token_logprobs

OPS = ("token_logprobs", "linear_logprobs")
GPU_TOKENS = [1024, 4096, 16384, 65536]


def vocabs(gpu: bool):
    """(name, hidden size, vocabulary, token counts of each op). On CPU, a 32k vocabulary at
    several sizes and Qwen2.5-0.5B's head (896 x 151936) at the sizes of issue 14's goals.
    64k tokens on GPU: eager's [N, V] logits and their fp32 softmax no longer fit (a row of its
    failure)."""
    ops = (*OPS, "loss_head")
    if gpu:
        return [("qwen2-7b", 3584, 152064, dict.fromkeys(ops, GPU_TOKENS)),
                ("llama3-8b", 4096, 128256, dict.fromkeys(ops, GPU_TOKENS))]
    return [("small", 512, 32000, dict(token_logprobs=[256, 1024, 4096, 8192],
                                       linear_logprobs=[256, 1024, 4096], loss_head=[256, 4096])),
            ("qwen2.5-0.5b", 896, 151936, dict(token_logprobs=[8192], linear_logprobs=[4096],
                                               loss_head=[4096]))]


def logit_inputs(N, V, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(logits=(2 * torch.randn(N, V, generator=g)).to(device, dtype),
                targets=torch.randint(0, V, (N,), generator=g).to(device))


def linear_inputs(N, D, V, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(N, D, generator=g).to(device, dtype),
                weight=(torch.randn(V, D, generator=g) / D ** 0.5).to(device, dtype),
                targets=torch.randint(0, V, (N,), generator=g).to(device))


def eager_token_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]


def eager_linear_logprobs(hidden, weight, targets):
    return eager_token_logprobs(hidden @ weight.T, targets)


def token_step(x, impl):
    logits = x["logits"].clone().requires_grad_(True)
    up = torch.randn(logits.shape[0], device=logits.device)
    if impl == "ours":
        fn = lambda: token_logprobs(logits, x["targets"])  # noqa: E731
    elif impl in ("eager", "compile"):
        f = torch.compile(eager_token_logprobs) if impl == "compile" else eager_token_logprobs
        fn = lambda: f(logits, x["targets"])  # noqa: E731
    elif impl == "trl":
        from trl.trainer.utils import selective_log_softmax
        fn = lambda: selective_log_softmax(logits, x["targets"])  # noqa: E731
    elif impl == "flash_attn_ce":
        from flash_attn.losses.cross_entropy import CrossEntropyLoss
        ce = CrossEntropyLoss(reduction="none")
        fn = lambda: -ce(logits, x["targets"])  # noqa: E731
    elif impl == "liger_ce":
        from liger_kernel.transformers import LigerCrossEntropyLoss
        ce = LigerCrossEntropyLoss(reduction="none")
        fn = lambda: -ce(logits, x["targets"])  # noqa: E731
    else:
        raise ValueError(impl)

    def step():
        logits.grad = None
        fn().backward(up)
    return step


def linear_step(x, impl):
    h = x["hidden"].clone().requires_grad_(True)
    w = x["weight"].clone().requires_grad_(True)
    up = torch.randn(h.shape[0], device=h.device)
    t = x["targets"]
    if impl == "ours":
        fn = lambda: linear_logprobs(h, w, t)  # noqa: E731
    elif impl in ("eager", "compile"):
        f = torch.compile(eager_linear_logprobs) if impl == "compile" else eager_linear_logprobs
        fn = lambda: f(h, w, t)  # noqa: E731
    elif impl == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        fn = lambda: -ce(w, h, t)  # noqa: E731
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy
        kw = {} if h.is_cuda else {"impl": "torch_compile"}  # its kernel is Triton-on-GPU
        fn = lambda: -linear_cross_entropy(h, w, t, reduction="none", **kw)  # noqa: E731
    else:
        raise ValueError(impl)

    def step():
        h.grad = w.grad = None
        fn().backward(up)
    return step


def jobs(op, model, device, quick: bool) -> List[Dict]:
    """The jobs of ``op`` for one entry of :func:`vocabs`."""
    gpu = device.type == "cuda"
    name, D, V, tokens_of = model
    out = []
    for N in tokens_of[op][:1] if quick else tokens_of[op]:
        if op == "token_logprobs":
            impls = ["ours", "trl", "eager"] + (["compile"] if not quick else [])
            impls += [i for i, m in (("flash_attn_ce", "flash_attn"), ("liger_ce",
                      "liger_kernel")) if gpu and installed(m)]
            out.append(dict(op=op, shape=[N, V], impls=impls, model=name))
        else:
            impls = ["ours", "cce", "eager"] + (["compile"] if not quick else [])
            impls += [i for i, m in (("liger_flce", "liger_kernel"),) if gpu and installed(m)]
            out.append(dict(op=op, shape=[N, D, V], impls=impls, model=name))
    return out


def build(op, impl, shape, device, dtype):
    if op == "token_logprobs":
        return token_step(logit_inputs(*shape, device, dtype), impl)
    return linear_step(linear_inputs(*shape, device, dtype), impl)


def floor_bytes_flops(op, shape, elem):
    if op == "token_logprobs":
        N, V = shape
        return 3 * N * V * elem, 0.0  # read logits twice (fwd, bwd), write the grad
    N, D, V = shape
    # forward logits, grad of hidden, grad of weight
    return (2 * V * D + 2 * N * D) * elem, 6 * N * D * V


def needed_bytes(op, impl, shape, elem) -> float:
    """A rough peak of one forward + backward: the [N, V] tensors each implementation holds
    at once (inputs included)."""
    if op == "token_logprobs":  # measured at N=8192, V=151936: eager and TRL ~5 copies
        N, V = shape           # (TRL's OOM-killed a 24 GiB run), torch.compile ~4
        return {"ours": 2, "compile": 4}.get(impl, 5) * N * V * max(elem, 4)
    N, D, V = shape
    logits = 0 if impl in ("ours", "cce") else 3 * N * V * 4
    return logits + 3 * V * D * elem


def tokens(op, shape) -> int:
    return shape[0]
