"""The kernels' GPU-only risks, pinned on CPU (issue 24 item 2): the production tile, int64
index arithmetic, the device guard, the log-prob kernel's configuration and its ignored rows,
fp32 accumulation of d_hidden."""
import inspect
import math

import pytest
import torch
from batches import make_batch, to

from dqo_kernels import dqo_scan_reference, fused_dqo_loss, linear_logprobs, row_scale
from dqo_kernels.device import device_context, device_guard
from dqo_kernels.logprobs.core import accumulate_mm
from dqo_kernels.logprobs.naive import linear_logprobs_reference
from dqo_kernels.validation import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
ON_GPU = torch.cuda.is_available()
INTERPRETED = not ON_GPU

if triton_available():
    import triton
    import triton.language as tl

    from dqo_kernels.triton_index import offsets64

    @triton.jit
    def _offsets_probe(out, s_b, s_t, T, BT: tl.constexpr):
        i_b = tl.program_id(0)
        o_t = T - 1 - tl.arange(0, BT)
        tl.store(out + i_b * BT + tl.arange(0, BT), offsets64(i_b, s_b, o_t, s_t))


def kernel_source(module, name: str) -> str:
    """The text of one top-level function of ``module``."""
    src = inspect.getsource(module)
    start = src.index(f"def {name}(")
    end = src.find("\n@", start)
    return src[start:] if end < 0 else src[start:end]


@needs_triton
@pytest.mark.parametrize("target_grad", [False, True])
def test_triton_production_tile_multi_block_rows(target_grad, device):
    """BT = 1024 as the launcher picks it for T = 2100 (three blocks a row, the last one
    partial), fp32, against the float64 reference: the carries of both passes across full
    production tiles, and garbage off the mask (bounds-only load masks)."""
    from dqo_kernels.dqo_loss import triton as dqo_triton

    B, T = 2, 2100
    assert dqo_triton._block_size(T) == 1024 == dqo_triton.MAX_BLOCK_T
    batch = to(make_batch("interleaved", B=B, T=T, seed=24), torch.float32, device)
    ref = to(batch, torch.float64, "cpu")
    kw = dict(lam=0.9, gamma=0.99, is_clip=2.0, beta=0.2, target_grad=target_grad)
    outs = []
    for b, backend in ((batch, "triton"), (ref, "torch")):
        out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                             behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"],
                             backend=backend, **kw)
        grads = torch.autograd.grad(out.loss, [b["logp"], b["values"]])
        outs.append([x.detach().double().cpu() for x in
                     (out.loss, out.returns, out.weights, out.td_error, *grads)])
    for got, exp in zip(*outs):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, exp, rtol=2e-5, atol=2e-5)


@needs_triton
def test_scan_reference_agrees_at_production_tile():
    """The reference itself at the tile's shape (guards the test above against a shared bug)."""
    b = make_batch("right", B=2, T=2100, seed=3)
    s = row_scale(b["mask"], "token-mean", dtype=torch.float64)
    res = dqo_scan_reference(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"], s,
                             behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"])
    assert torch.isfinite(res.returns).all()


# --------------------------------------------------------------------------------------------
# int64 index arithmetic, through the kernels' own helper


@needs_triton
def test_offsets_past_2_31_are_exact():
    """The kernels compute every element offset with ``offsets64``; run it (interpreted, as
    the kernels run it here) on int32 arguments whose products pass 2^31 (a transposed view
    with ``s_t = B``, rows far into a [N, V] buffer), without allocating that memory."""
    B, BT, T = 3, 16, 70_000
    s_b, s_t = 2**30 + 7, 40_000  # each fits in int32; i_b * s_b and o_t * s_t do not
    out = torch.empty(B, BT, dtype=torch.int64)
    _offsets_probe[(B,)](out, s_b, s_t, T, BT=BT)
    exp = torch.tensor([[b * s_b + (T - 1 - j) * s_t for j in range(BT)] for b in range(B)])
    assert exp.max().item() > 2**32
    assert torch.equal(out, exp)


def test_kernels_use_the_int64_offsets():
    """Every pointer of the DQO kernel goes through offsets64 (no int32 ``o_t * stride``),
    and the log-prob kernels' row index is int64."""
    pytest.importorskip("triton")
    from dqo_kernels.dqo_loss import triton as dqo_triton
    from dqo_kernels.logprobs import triton as lp_triton

    src = kernel_source(dqo_triton, "dqo_loss_fwd_kernel")
    assert "* s_" not in src and src.count("offsets64(") == 11
    for kernel in ("logprobs_fwd_kernel", "logprobs_bwd_kernel"):
        assert "i_n = tl.program_id(0).to(tl.int64)" in kernel_source(lp_triton, kernel)


# --------------------------------------------------------------------------------------------
# bounds-only load masks


def test_dqo_loads_are_masked_by_bounds_only():
    """No load of the DQO kernel waits on the data-dependent action mask (every value read is
    used through tl.where on it): the masks are the bounds, ``m_t``."""
    pytest.importorskip("triton")
    from dqo_kernels.dqo_loss import triton as dqo_triton

    src = kernel_source(dqo_triton, "dqo_loss_fwd_kernel")
    assert "mask=b_m" not in src and "mask=m_t" in src


# --------------------------------------------------------------------------------------------
# the device guard


class _Recorder:
    def __init__(self):
        self.entered = []

    def __call__(self, device):
        rec = self

        class Ctx:
            def __enter__(self):
                rec.entered.append(device)

            def __exit__(self, *exc):
                return False
        return Ctx()


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec)
    with device_context(torch.device("cuda", 1)):
        pass
    assert rec.entered == [torch.device("cuda", 1)]
    with device_context(torch.device("cpu")):
        pass
    assert len(rec.entered) == 1  # nothing to do on CPU

    seen = []

    @device_guard
    def launch(x, y=None):
        seen.append((x, y))
        return 7

    x = torch.zeros(2)
    assert launch(x, y=1) == 7 and seen == [(x, 1)] and len(rec.entered) == 1
    monkeypatch.setattr("dqo_kernels.device.device_of",
                        lambda *a, **k: torch.device("cuda", 3))
    assert launch(x) == 7 and rec.entered[-1] == torch.device("cuda", 3)


def test_every_triton_launcher_is_guarded():
    pytest.importorskip("triton")
    from dqo_kernels.dqo_loss import triton as dqo_triton
    from dqo_kernels.logprobs import triton as lp_triton

    for fn in (dqo_triton.dqo_loss_forward, lp_triton.lse_forward, lp_triton.logits_grad):
        assert fn.__wrapped__ is not None
        assert fn.__code__.co_filename.endswith("device.py")


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_launch_on_a_gpu_that_is_not_current():
    b = to(make_batch("right", B=3, T=40, seed=1), torch.float32, "cuda:1")
    with torch.cuda.device(0):
        out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                             backend="triton")
    exp = fused_dqo_loss(*[to(b, torch.float64, "cpu")[k] for k in
                           ("logp", "ref_logp", "values", "rewards", "mask")], backend="torch")
    torch.testing.assert_close(out.loss.double().cpu(), exp.loss, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the log-prob kernel: Liger's block and warps, target once, ignored rows skipped


def test_logprob_forward_config_is_ligers():
    pytest.importorskip("triton")
    from dqo_kernels.logprobs import triton as lp_triton

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert lp_triton.MAX_FUSED_SIZE == 65536 // 2
    assert lp_triton.fwd_config(152064, cuda) == (32768, 32)
    assert lp_triton.fwd_config(300, cuda) == (512, 32)
    assert lp_triton.fwd_config(152064, cpu) == (32768, 16)
    src = kernel_source(lp_triton, "logprobs_fwd_kernel")
    loop = src[src.index("for i_v"):]
    assert "b_y" not in loop  # the target logit is loaded once, outside the sweep


@needs_triton
@pytest.mark.parametrize("ignore", [-7, 5])
def test_ignored_rows_are_skipped(ignore, device):
    """Rows whose target is ignore_index never read their logits: NaN there reaches neither
    the forward's outputs nor the gradient (a sweep would give NaN, 0 * NaN included)."""
    from dqo_kernels.logprobs import triton as lp_triton

    N, V = 5, 300
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g).to(device)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    y[y == 5] = 6
    y[1] = y[3] = ignore
    x[1] = x[3] = math.nan
    lse, zt, ez = lp_triton.lse_forward(x, y, 0, 1.0, True, ignore_index=ignore)
    for t in (lse, zt, ez):
        assert torch.isfinite(t).all() and t[1] == 0 and t[3] == 0
    exp = torch.logsumexp(x[[0, 2, 4]].double().cpu(), -1)
    torch.testing.assert_close(lse[[0, 2, 4]].double().cpu(), exp)
    grad = torch.randn(N, generator=g).to(device)
    out = torch.full_like(x, 5.0)
    lp_triton.logits_grad(x, y, lse, grad, 0, 1.0, out, ignore_index=ignore)
    assert torch.isfinite(out).all() and (out[[1, 3]] == 0).all()
    # through the public op, in place: the ignored rows' memory becomes a zero gradient
    from dqo_kernels import token_logprobs
    xs = x.clone().requires_grad_()
    logp = token_logprobs(xs, y, ignore_index=ignore, backend="triton")
    assert torch.isfinite(logp).all() and logp[1] == 0
    (gx,) = torch.autograd.grad(logp, xs, grad)
    assert torch.isfinite(gx).all() and (gx[[1, 3]] == 0).all()


# --------------------------------------------------------------------------------------------
# fp32 accumulation of d_hidden in linear_logprobs


def _torch_bf16_d_hidden(hb, wb, y, up):
    """What an eager bf16 model computes: bf16 logits, their log-softmax in fp32, one bf16
    GEMM (fp32 accumulation inside) for the hidden gradient."""
    hb = hb.clone().requires_grad_()
    logp = torch.log_softmax((hb @ wb.T).float(), -1).gather(-1, y[:, None])[:, 0]
    (dh,) = torch.autograd.grad(logp, hb, up.float())
    return dh


@pytest.mark.parametrize("backend", ["torch", "cpp"] + (["triton"] if triton_available() else []))
@pytest.mark.parametrize("seed", [1, 2])
def test_linear_logprobs_bf16_d_hidden_accumulates_in_fp32(backend, seed):
    """128 vocabulary chunks, and lm_head rows sharing a common direction (as trained ones
    do), so that the chunks' products are large and cancel in the sum: rounding each chunk's
    product to bf16 before the sum (the old accumulation) gave ~2x torch's bf16 error;
    accumulated in fp32 it is torch's own."""
    from dqo_kernels._native import load as native
    if backend == "cpp" and not native.is_available():
        pytest.skip("no C++ compiler")
    if backend == "triton" and INTERPRETED:
        # the interpreter casts fp32 -> bf16 by truncation (compiled Triton rounds to
        # nearest): its bf16 d_logits carry twice the error of any real run
        pytest.skip("the interpreter truncates bf16 stores")
    dev = "cuda" if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(seed)
    N, D, V = 32, 64, 2048
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    u = torch.randn(D, generator=g, dtype=torch.float64)
    w = (2 * torch.randn(V, D, generator=g, dtype=torch.float64) + 4 * u) / math.sqrt(D)
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    hb, wb = h.to(torch.bfloat16), w.to(torch.bfloat16)
    h64 = hb.double().requires_grad_()
    (exact,) = torch.autograd.grad(linear_logprobs_reference(h64, wb.double(), y), h64, up)
    hx = hb.to(dev).requires_grad_()
    out = linear_logprobs(hx, wb.to(dev), y.to(dev), chunk_size=16, backend=backend)
    (ours,) = torch.autograd.grad(out, hx, up.float().to(dev))
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.cpu().double() - exact).abs().max().item()
    err_torch = (_torch_bf16_d_hidden(hb, wb, y, up).double() - exact).abs().max().item()
    assert err_ours <= 1.25 * err_torch, (err_ours, err_torch)


def test_accumulate_mm_keeps_the_product_in_fp32():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    acc = torch.full((8, 16), 1.0)
    accumulate_mm(acc, a, b)
    exp = 1.0 + a.double() @ b.double()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), exp, rtol=1e-6, atol=1e-5)
    # the CUDA branch (out_dtype GEMM), checked for its signature and dtypes on meta tensors
    assert "dtype" in torch.ops.aten.mm.overloads()
    am, bm, cm = (t.to("meta") for t in (a, b, acc))
    accumulate_mm(cm, am, bm)
    assert cm.dtype == torch.float32 and cm.shape == (8, 16)
