"""Property tests: the native kernel equals the float64 reference for arbitrary shapes, masks
and hyper-parameters (hypothesis draws them; failures shrink to a minimal case)."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from batches import LAYOUTS, make_batch, to  # noqa: E402
from dqo_kernels import dqo_scan_cpp, fused_dqo_loss  # noqa: E402

needs_cpp = pytest.mark.skipif(not dqo_scan_cpp.is_available(), reason="no C++ compiler")


@needs_cpp
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 40), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 10**6), lam=st.floats(0, 1), gamma=st.floats(0.05, 1),
       beta=st.floats(0.01, 2), clip=st.sampled_from([1.0, 1.5, 4.0, math.inf]),
       is_policy=st.booleans(), is_value=st.booleans(), target_grad=st.booleans(),
       agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
       behavior=st.booleans(), bootstrap=st.booleans())
def test_cpp_equals_reference(B, T, layout, seed, lam, gamma, beta, clip, is_policy, is_value,
                              target_grad, agg, behavior, bootstrap):
    batch = make_batch(layout, B, T, seed=seed, behavior=behavior, bootstrap=bootstrap)
    kw = dict(lam=lam, gamma=gamma, beta=beta, is_clip=clip, is_policy=is_policy,
              is_value=is_value, target_grad=target_grad, loss_agg=agg)
    outs = []
    for backend in ("cpp", "torch"):
        b = to(batch, torch.float64)
        out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                             behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"],
                             backend=backend, **kw)
        grads = torch.autograd.grad(out.loss, [b["logp"], b["values"]])
        outs.append((out.loss.detach(), out.returns, out.weights, out.td_error, *grads))
    for got, exp in zip(*outs):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-10, equal_nan=False)
