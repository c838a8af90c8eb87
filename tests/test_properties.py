"""Property tests: the native kernel equals the float64 reference for arbitrary shapes, masks
and hyper-parameters (hypothesis draws them; failures shrink to a minimal case)."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from batches import LAYOUTS, make_batch, to  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dqo_kernels import dqo_scan_cpp, fused_dqo_loss  # noqa: E402
from dqo_kernels.validation import triton_available as _triton_available  # noqa: E402

needs_cpp = pytest.mark.skipif(not dqo_scan_cpp.is_available(), reason="no C++ compiler")


@pytest.fixture(scope="module")
def monkeypatch_blocks():
    # module-scoped (hypothesis forbids function-scoped fixtures in @given tests)
    from dqo_kernels import dqo_scan_triton
    old, dqo_scan_triton.MAX_BLOCK_T = dqo_scan_triton.MAX_BLOCK_T, 16
    yield
    dqo_scan_triton.MAX_BLOCK_T = old


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


@pytest.mark.skipif(not _triton_available(), reason="triton not installed")
@settings(max_examples=25, deadline=None)
@given(**CONFIG)
def test_triton_equals_reference(monkeypatch_blocks, device, **kw):
    """In the interpreter (CPU) or compiled (GPU); 16-token tiles cross block boundaries."""
    check_against_reference("triton", torch.float32, device, dict(rtol=5e-5, atol=5e-5), **kw)
