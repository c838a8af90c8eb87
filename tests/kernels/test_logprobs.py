"""token_logprobs / linear_logprobs against the float64 references, values and gradients."""
import math

import pytest
import torch

import dqo_kernels.logprobs.core as logprobs_core
from dqo_kernels import empty_cache, fused_dqo_loss, linear_logprobs, token_logprobs
from dqo_kernels._native import load as native
from dqo_kernels.logprobs.naive import linear_logprobs_reference, token_logprobs_reference
from dqo_kernels.validation import triton_available as _triton_available

BACKENDS = (["torch"] + (["cpp"] if native.is_available() else [])
            + (["triton"] if _triton_available() else []))
ON_GPU = torch.cuda.is_available()


@pytest.fixture
def small_blocks(monkeypatch):
    """128-column blocks so that small vocabularies still span several blocks."""
    if _triton_available():
        from dqo_kernels.logprobs import triton as logprobs_triton
        monkeypatch.setattr(logprobs_triton, "FWD_BV", 128)
        monkeypatch.setattr(logprobs_triton, "BWD_BV", 128)


def dev_for(backend, device):
    return device if backend == "triton" else torch.device("cpu")


def make_logits(N, V, *, seed, scale=3.0, ignore_frac=0.2, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(N, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = -100
    if neg_inf:  # a banned part of the vocabulary, as with constrained decoding
        banned = torch.rand(V, generator=g) < 0.3
        banned[targets.clamp_min(0)] = False
        logits[:, banned] = -math.inf
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    return logits, targets, upstream


def check_token_logprobs(logits64, targets, upstream, backend, dtype, device, tol, **kw):
    dev = dev_for(backend, device)
    x = logits64.to(dtype).to(dev).requires_grad_()
    ref_x = x.detach().double().cpu().requires_grad_()  # the reference sees the rounded inputs
    got = token_logprobs(x, targets.to(dev), backend=backend, **kw)
    exp = token_logprobs_reference(ref_x, targets, **kw)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double().cpu(), exp, **tol)
    (gx,) = torch.autograd.grad(got, x, upstream.to(got.dtype).to(dev))
    (ex,) = torch.autograd.grad(exp, ref_x, upstream)
    assert gx.dtype == dtype
    torch.testing.assert_close(gx.double().cpu(), ex, **tol)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 300])
def test_token_logprobs_matches_reference(backend, dtype, V, device, small_blocks):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton takes fp32/fp16/bf16")
    logits, targets, up = make_logits(9, V, seed=V)
    check_token_logprobs(logits, targets, up, backend, dtype, device, TOL[dtype],
                         temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_large_logits_and_banned_vocab(backend, device, small_blocks):
    logits, targets, up = make_logits(8, 333, seed=1, scale=1e4, neg_inf=True)
    check_token_logprobs(logits, targets, up, backend, torch.float32, device,
                         dict(rtol=1e-5, atol=1e-3))
    logits, targets, up = make_logits(8, 333, seed=2, scale=1e4)  # |x| < 65504
    check_token_logprobs(logits, targets, up, backend, torch.float16, device,
                         dict(rtol=1e-3, atol=5e-2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_entropy(backend, device, small_blocks):
    dev = dev_for(backend, device)
    logits, targets, up = make_logits(7, 260, seed=4, neg_inf=True)
    x = logits.float().to(dev).requires_grad_()
    ref_x = x.detach().double().cpu().requires_grad_()
    logp, ent = token_logprobs(x, targets.to(dev), temperature=1.3, return_entropy=True,
                               backend=backend)
    e_logp, e_ent = token_logprobs_reference(ref_x, targets, temperature=1.3,
                                             return_entropy=True)
    torch.testing.assert_close(ent.double().cpu(), e_ent, rtol=1e-5, atol=1e-5)
    up_h = torch.randn(7, dtype=torch.float64)
    (gx,) = torch.autograd.grad((logp * up.float().to(dev)).sum()
                                + (ent * up_h.float().to(dev)).sum(), x)
    (ex,) = torch.autograd.grad((e_logp * up).sum() + (e_ent * up_h).sum(), ref_x)
    torch.testing.assert_close(gx.double().cpu(), ex, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_3d_ignore_and_inplace(backend, device, small_blocks):
    dev = dev_for(backend, device)
    logits, targets, up = make_logits(12, 140, seed=5, ignore_frac=0.4)
    x3 = logits.float().view(3, 4, 140).to(dev)
    y3 = targets.view(3, 4).to(dev)
    y3[1] = -100  # a fully ignored row
    leaf = x3.clone().requires_grad_()
    work = leaf * 1.0  # a non-leaf buffer the in-place backward may overwrite
    out = token_logprobs(work, y3, inplace_backward=True, backend=backend)
    assert out.shape == (3, 4) and (out[1] == 0).all()
    exp = token_logprobs_reference(x3.double().cpu(), y3.cpu())
    torch.testing.assert_close(out.double().cpu(), exp, rtol=1e-5, atol=1e-5)
    out.backward(up.view(3, 4).float().to(dev))
    ref_leaf = x3.double().cpu().requires_grad_()
    token_logprobs_reference(ref_leaf, y3.cpu()).backward(up.view(3, 4))
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_leaf.grad, rtol=1e-5, atol=1e-5)
    assert (leaf.grad[1] == 0).all()
    torch.testing.assert_close(work.detach(), leaf.grad)  # the gradient was written in place


OVERLAPPING = {
    "expand": lambda x: x[:1].expand(4, -1),
    "expand-3d": lambda x: x[:1].expand(4, -1)[None],
    "rows-share-columns": lambda x: x.flatten().as_strided((4, 140), (70, 1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", OVERLAPPING)
def test_token_logprobs_inplace_refuses_overlapping_rows(backend, view, device, small_blocks):
    """Rows that share memory would overwrite each other's gradient in place: refused. Without
    inplace_backward the gradient is right."""
    dev = dev_for(backend, device)
    logits, targets, up = make_logits(4, 140, seed=8, ignore_frac=0.0)
    leaf = logits.float().to(dev).requires_grad_()
    x = OVERLAPPING[view](leaf * 1.0)
    y = targets.to(dev).view(x.shape[:-1])
    with pytest.raises(ValueError, match=r"inplace_backward: expected logits whose rows do not "
                                         r"overlap in memory .*, got shape \(.*\) with strides"):
        token_logprobs(x, y, inplace_backward=True, backend=backend)
    token_logprobs(x, y, backend=backend).backward(up.float().to(dev).view(y.shape))
    ref_leaf = logits.float().double().requires_grad_()
    ref_x = OVERLAPPING[view](ref_leaf * 1.0)
    token_logprobs_reference(ref_x, y.cpu()).backward(up.view(y.shape))
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_inplace_is_seen_by_autograd(backend, device, small_blocks):
    """tanh saves its output for its backward; the in-place gradient overwrites that output.
    Autograd must refuse (every backend), not compute tanh's gradient from the overwritten
    values."""
    dev = dev_for(backend, device)
    logits, targets, up = make_logits(6, 140, seed=9, ignore_frac=0.0)
    leaf = logits.float().to(dev).requires_grad_()
    out = token_logprobs(torch.tanh(leaf), targets.to(dev), inplace_backward=True,
                         backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(up.float().to(dev))


def bf16_error_bound(ours, torch_bf16, exact):
    """Our bf16 error may not exceed torch's own bf16 computation's error (times 1.5, plus a
    hair for the fp32 rounding both have)."""
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (torch_bf16.double() - exact).abs().max().item()
    assert err_ours <= 1.5 * err_torch + 1e-6, (err_ours, err_torch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_bf16_within_torch_bf16_error(backend, device, small_blocks):
    dev = dev_for(backend, device)
    logits, targets, up = make_logits(16, 500, seed=8)
    exact = token_logprobs_reference(logits, targets)
    x = logits.to(torch.bfloat16)
    torch_bf16 = torch.log_softmax(x.to(dev), -1).gather(
        -1, targets.clamp_min(0).to(dev)[:, None])[:, 0].cpu()
    torch_bf16 = torch.where(targets == -100, 0.0, torch_bf16.float())
    ours = token_logprobs(x.to(dev), targets.to(dev), backend=backend).cpu()
    bf16_error_bound(ours, torch_bf16, exact)


# ---------------------------------------------------------------------------------------------


def make_linear(N, D, V, *, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D) * 2
    b = 0.5 * torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.2] = -100
    up = torch.randn(N, generator=g, dtype=torch.float64)
    return h, w, b, y, up


def run_linear(h, w, b, y, up, fn, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    bias = leaves[2] if b is not None else None
    out = fn(leaves[0], leaves[1], y, bias=bias, **kw)
    grads = torch.autograd.grad(out, leaves, up.to(out.dtype).to(out.device))
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [64, 1000])
def test_linear_logprobs_matches_reference(backend, dtype, bias, chunk_size, device,
                                           small_blocks):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton takes fp32/fp16/bf16")
    dev = dev_for(backend, device)
    h, w, b, y, up = make_linear(13, 16, 300, seed=int(bias) + chunk_size, bias=bias)
    h, w = h.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    args = [x.to(dev) if x is not None else None for x in (h, w, b, y, up)]
    got, g_grads = run_linear(*args, linear_logprobs, temperature=0.8, backend=backend,
                              chunk_size=chunk_size)
    exp, e_grads = run_linear(*[x.double().cpu() if x is not None and x.is_floating_point()
                                else x for x in (h, w, b, y, up)],
                              linear_logprobs_reference, temperature=0.8)
    tol = TOL[dtype] if dtype != torch.float16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.double().cpu(), exp, **tol)
    for name, a, e in zip(("hidden", "weight", "bias"), g_grads, e_grads):
        assert a.dtype == dtype
        gtol = tol if dtype != torch.float16 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(a.double().cpu(), e, **gtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_bf16_within_torch_bf16_error(backend, device, small_blocks):
    dev = dev_for(backend, device)
    h, w, _, y, up = make_linear(24, 32, 700, seed=3, bias=False)
    exact = linear_logprobs_reference(h, w, y)
    hb, wb = h.to(torch.bfloat16).to(dev), w.to(torch.bfloat16).to(dev)
    torch_logits = hb @ wb.T  # what an eager bf16 model produces
    torch_bf16 = torch.log_softmax(torch_logits.float(), -1).gather(
        -1, y.clamp_min(0).to(dev)[:, None])[:, 0]
    torch_bf16 = torch.where(y.to(dev) == -100, 0.0, torch_bf16).cpu()
    ours = linear_logprobs(hb, wb, y.to(dev), chunk_size=256, backend=backend).cpu()
    bf16_error_bound(ours, torch_bf16, exact)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_linear_logprobs_large_vocab_gpu():
    h, w, b, y, up = make_linear(64, 128, 70_000, seed=0, bias=False)
    args = [x.cuda() if x is not None else None for x in (h.float(), w.float(), b, y, up)]
    got, g_grads = run_linear(*args, linear_logprobs)
    exp, e_grads = run_linear(h, w, None, y, up, linear_logprobs_reference)
    torch.testing.assert_close(got.double().cpu(), exp, rtol=1e-4, atol=1e-4)
    for a, e in zip(g_grads, e_grads):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_to_dqo_loss_composition(backend, device, small_blocks):
    """The README's composition: hidden states -> linear_logprobs -> fused_dqo_loss -> backward
    reaches the lm_head weight, equal to the materialised-logits pipeline."""
    dev = dev_for(backend, device)
    B, T, D, V = 2, 6, 8, 50
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :2] = False
    y[~mask] = -100
    ref_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.zeros(B, T, dtype=torch.float64)
    rewards[:, -1] = 1.0
    grads = []
    for fn, dt, dv, kw in ((linear_logprobs, torch.float32, dev, dict(backend=backend,
                                                                       chunk_size=16)),
                           (linear_logprobs_reference, torch.float64, "cpu", {})):
        wl = w.to(dt).to(dv).requires_grad_()
        logp = fn(h.to(dt).to(dv), wl, y.to(dv), **kw)
        out = fused_dqo_loss(logp, ref_logp.to(dt).to(dv), values.to(dt).to(dv),
                             rewards.to(dt).to(dv), mask.to(dv), lam=0.9)
        (gw,) = torch.autograd.grad(out.loss, wl)
        grads.append(gw.double().cpu())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda: token_logprobs(torch.zeros(3, 5), torch.tensor([0, 5, 1])),
     r"targets: expected ids in \[0, 5\) or ignore_index=-100, got 5 at index \(1,\)"),
    (lambda: token_logprobs(torch.zeros(3, 5), torch.zeros(3)),
     r"targets: expected token ids of dtype torch.int64 or torch.int32, got dtype "
     r"torch.float32$"),
    (lambda: token_logprobs(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long)),
     r"targets: expected shape \(3,\), got shape \(4,\)"),
    (lambda: token_logprobs(torch.zeros(5), torch.zeros(5, dtype=torch.long)),
     r"logits: expected \[N, V\] or \[B, T, V\], got shape \(5,\)"),
    (lambda: token_logprobs(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), temperature=0),
     r"temperature: expected a value in \(0.0, inf\]"),
    (lambda: linear_logprobs(torch.zeros(3, 4), torch.zeros(6, 5),
                             torch.zeros(3, dtype=torch.long)),
     r"weight: expected shape \[V, 4\] \(hidden's last dim\), got \(6, 5\)"),
    (lambda: linear_logprobs(torch.zeros(3, 4), torch.zeros(6, 4).double(),
                             torch.zeros(3, dtype=torch.long)),
     r"weight: expected dtype torch.float32 \(hidden's\), got torch.float64"),
    (lambda: linear_logprobs(torch.zeros(3, 4), torch.zeros(6, 4), torch.zeros(3, dtype=torch.long),
                             bias=torch.zeros(5)), r"bias: expected shape \(6,\)"),
    (lambda: linear_logprobs(torch.zeros(3, 4), torch.zeros(6, 4), torch.zeros(3, dtype=torch.long),
                             chunk_size=math.inf),
     r"chunk_size: expected a value in \[1.0, inf\), got inf"),
    (lambda: token_logprobs(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), backend="cuda"),
     r"backend: expected None or one of \('triton', 'cpp', 'torch'\)"),
])
def test_logprobs_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(not native.is_available(), reason="no C++ compiler")
@pytest.mark.parametrize("hugepages", ["1", "0"])
def test_cpp_large_buffers_on_huge_pages(hugepages, monkeypatch):
    """Gradient and chunk buffers of 4 MiB and more come from the huge-page allocator."""
    from dqo_kernels.logprobs import cpu_pool
    monkeypatch.setenv("DQO_KERNELS_HUGEPAGES", hugepages)
    buf = cpu_pool.empty((3, 2**20), torch.float16)
    assert buf.shape == (3, 2**20) and buf.dtype == torch.float16 and buf.is_contiguous()
    buf.fill_(1.5)
    assert float(buf.float().sum()) == 1.5 * 3 * 2**20
    logits, targets, up = make_logits(64, 20000, seed=3)  # 5 MB of fp32 logits
    check_token_logprobs(logits, targets, up, "cpp", torch.float32, torch.device("cpu"),
                         TOL[torch.float32])
    h, w = torch.randn(300, 16, dtype=torch.float64), torch.randn(5000, 16, dtype=torch.float64)
    y, g = torch.randint(0, 5000, (300,)), torch.randn(300, dtype=torch.float64)
    got, grads = run_linear(h, w, None, y, g, linear_logprobs, backend="cpp")  # 12 MB chunk
    exp, egrads = run_linear(h, w, None, y, g, linear_logprobs_reference)
    torch.testing.assert_close(got, exp)
    for a, e in zip(grads, egrads):
        torch.testing.assert_close(a, e)


@pytest.mark.skipif(not native.is_available(), reason="no C++ compiler")
def test_cpp_buffer_pool_reuses_only_what_no_tensor_uses(monkeypatch):
    """The gradient buffers' pool hands a buffer out again only when no tensor (a view, a
    .grad) refers to it any more: reuse never aliases live data."""
    from dqo_kernels.logprobs import cpu_pool
    monkeypatch.setattr(cpu_pool, "_pool", cpu_pool._RegionPool())
    monkeypatch.setenv("DQO_KERNELS_POOL", "1")  # this tests the pool, whatever the caller set
    shape = (3, 2**20)
    a = cpu_pool.empty(shape, torch.float32)
    a.fill_(7.0)
    b = cpu_pool.empty(shape, torch.float32)  # a is alive
    assert b.data_ptr() != a.data_ptr()
    pa, view = a.data_ptr(), a[1:]
    del a
    c = cpu_pool.empty(shape, torch.float32)  # a's memory lives on in the view
    assert c.data_ptr() != pa and bool((view == 7.0).all())
    x = torch.zeros(4, requires_grad=True)
    x.grad = view[0, :4]  # as autograd keeps a gradient
    del view
    assert cpu_pool.empty(shape, torch.float32).data_ptr() != pa
    x.grad = None
    del b, c
    d = cpu_pool.empty(shape, torch.float32)
    assert d.data_ptr() == pa  # free again: reused
    del d
    smaller = cpu_pool.empty((3, 2**20 - 4096), torch.float32)  # a shorter batch: fits
    assert smaller.data_ptr() == pa
    del smaller
    assert len(cpu_pool._pool.regions) <= cpu_pool.POOL_REGIONS
    monkeypatch.setattr(cpu_pool, "POOL_BYTES", 5 * 2**22)  # room for one 20 MiB region
    pool = cpu_pool._pool
    big = cpu_pool.empty((2**22,), torch.float32)  # 16 MiB: the free ones make room
    assert sum(len(r) for r in pool.regions) <= cpu_pool.POOL_BYTES
    empty_cache()  # the free regions go; big's, in use, stays
    assert len(pool.regions) == 1 and len(pool.regions[0]) >= big.numel() * 4
    del big
    assert empty_cache() >= 2**24 and pool.regions == []


def test_cpp_backend_refuses_gpu_tensors():
    with pytest.raises(ValueError, match=r"backend: 'cpp' needs CPU tensors, got tensors on cuda"):
        logprobs_core._impl("cpp", torch.device("cuda"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_row_strided_logits(backend, dtype, device, small_blocks):
    """Logits that are a column slice of a wider buffer (row stride > V) are read in place."""
    dev = dev_for(backend, device)
    logits, targets, up = make_logits(6, 300, seed=11)
    wide = torch.full((6, 320), 1e4, dtype=dtype, device=dev)  # poison beyond the slice
    wide[:, :300] = logits.to(dtype).to(dev)
    x = wide[:, :300]
    assert x.stride(0) == 320
    leaf = x.detach().requires_grad_()
    got = token_logprobs(leaf, targets.to(dev), backend=backend)
    ref_x = x.detach().double().cpu().requires_grad_()
    exp = token_logprobs_reference(ref_x, targets)
    torch.testing.assert_close(got.double().cpu(), exp, **TOL[dtype])
    (gx,) = torch.autograd.grad(got, leaf, up.float().to(dev))
    (ex,) = torch.autograd.grad(exp, ref_x, up)
    torch.testing.assert_close(gx.double().cpu(), ex, **TOL[dtype])
