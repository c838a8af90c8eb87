"""Property tests: the native kernel equals the float64 reference for arbitrary shapes, masks
and hyper-parameters (hypothesis draws them; failures shrink to a minimal case)."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from batches import LAYOUTS, make_batch, to  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dqo_kernels import fused_dqo_loss  # noqa: E402
from dqo_kernels.dqo_loss import cpp as dqo_loss_cpp  # noqa: E402
from dqo_kernels.validation import triton_available as _triton_available  # noqa: E402

needs_cpp = pytest.mark.skipif(not dqo_loss_cpp.is_available(), reason="no C++ compiler")


@pytest.fixture(scope="module")
def monkeypatch_blocks():
    # module-scoped (hypothesis forbids function-scoped fixtures in @given tests)
    from dqo_kernels.dqo_loss import triton as dqo_loss_triton
    old, dqo_loss_triton.MAX_BLOCK_T = dqo_loss_triton.MAX_BLOCK_T, 16
    yield
    dqo_loss_triton.MAX_BLOCK_T = old


CONFIG = dict(
    B=st.integers(1, 6), T=st.integers(1, 40), layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 10**6), lam=st.floats(0, 1), gamma=st.floats(0.05, 1),
    beta=st.floats(0.01, 2), clip=st.sampled_from([1.0, 1.5, 4.0, math.inf]),
    is_policy=st.booleans(), is_value=st.booleans(), target_grad=st.booleans(),
    agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
    behavior=st.booleans(), bootstrap=st.booleans())


def check_against_reference(backend, dtype, device, tol, B, T, layout, seed, lam, gamma, beta, clip,
                            is_policy, is_value, target_grad, agg, behavior, bootstrap):
    batch = make_batch(layout, B, T, seed=seed, behavior=behavior, bootstrap=bootstrap)
    kw = dict(lam=lam, gamma=gamma, beta=beta, is_clip=clip, is_policy=is_policy,
              is_value=is_value, target_grad=target_grad, loss_agg=agg)
    outs = []
    for be, dt, dev in ((backend, dtype, device), ("torch", torch.float64, "cpu")):
        b = to(batch, dt, dev)
        out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                             behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"],
                             backend=be, **kw)
        grads = torch.autograd.grad(out.loss, [b["logp"], b["values"]])
        outs.append([x.detach().double().cpu() for x in
                     (out.loss, out.returns, out.weights, out.td_error, *grads)])
    for got, exp in zip(*outs):
        torch.testing.assert_close(got, exp, **tol, equal_nan=False)


@needs_cpp
@settings(max_examples=40, deadline=None)
@given(**CONFIG)
def test_cpp_equals_reference(**kw):
    check_against_reference("cpp", torch.float64, "cpu", dict(rtol=1e-9, atol=1e-10), **kw)


@needs_cpp
@settings(max_examples=60, deadline=None)
@given(**{**CONFIG, "T": st.integers(1, 90)})
def test_cpp_fp32_equals_reference(**kw):
    """fp32 runs the kernel's 8-token vector path (groups wholly on, wholly off and mixed, the
    scalar tail): rows up to 90 tokens cross many groups."""
    check_against_reference("cpp", torch.float32, "cpu", dict(rtol=5e-5, atol=5e-5), **kw)


@pytest.mark.skipif(not _triton_available(), reason="triton not installed")
@settings(max_examples=25, deadline=None)
@given(**CONFIG)
def test_triton_equals_reference(monkeypatch_blocks, device, **kw):
    """In the interpreter (CPU) or compiled (GPU); 16-token tiles cross block boundaries."""
    check_against_reference("triton", torch.float32, device, dict(rtol=5e-5, atol=5e-5), **kw)


@needs_cpp
@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 12), V=st.integers(1, 70), seed=st.integers(0, 10**6),
       temperature=st.floats(0.25, 4), dtype=st.sampled_from(["fp64", "fp32", "bf16"]),
       entropy=st.booleans(), banned=st.booleans())
def test_cpp_token_logprobs_equal_reference(N, V, seed, temperature, dtype, entropy, banned):
    """The native log-prob kernels for any vocabulary size (vector body + scalar tail),
    temperature, dtype, ignored rows and banned (-inf) vocabulary, values and gradients."""
    from dqo_kernels import token_logprobs
    from dqo_kernels.logprobs.naive import token_logprobs_reference
    g = torch.Generator().manual_seed(seed)
    x64 = 4 * torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.25] = -100
    if banned and V > 1:
        ban = torch.rand(V, generator=g) < 0.3
        ban[y.clamp_min(0)] = False
        x64[:, ban] = -math.inf
    dt = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tol = {"fp64": dict(rtol=1e-10, atol=1e-10), "fp32": dict(rtol=2e-5, atol=2e-5),
           "bf16": dict(rtol=1e-4, atol=1e-4)}[dtype]  # bf16 inputs, fp32 arithmetic
    gtol = dict(rtol=8e-3, atol=8e-3) if dtype == "bf16" else dict(tol)  # bf16 gradient
    if dtype == "fp32" and entropy:
        # the entropy gradient is p (z - E[z]) with E[z] = lse - H: fp32 rounding of z-sized
        # terms (|z| = |x| / T reaches ~50 here), a few ulps of max|z|
        zmax = float(x64[torch.isfinite(x64)].abs().max()) / temperature if V > 1 else 1.0
        gtol["atol"] = max(gtol["atol"], 2e-6 * zmax)
    x = x64.to(dt).requires_grad_()
    ref_x = x.detach().double().requires_grad_()  # the reference sees the rounded inputs
    kw = dict(temperature=temperature, return_entropy=entropy)
    got = token_logprobs(x, y, backend="cpp", **kw)
    exp = token_logprobs_reference(ref_x, y, **kw)
    got, exp = (got, exp) if entropy else ((got,), (exp,))
    ups = [torch.randn(N, generator=g, dtype=torch.float64) for _ in got]
    gx = torch.autograd.grad(got, x, [u.to(got[0].dtype) for u in ups])[0]
    ex = torch.autograd.grad(exp, ref_x, ups)[0]
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, **tol)
    torch.testing.assert_close(gx.double(), ex, **gtol)
