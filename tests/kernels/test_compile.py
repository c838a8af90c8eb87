"""torch.compile(fullgraph=True) around fused_dqo_loss and linear_logprobs (issue 24 item 4):
they are torch.library custom ops there, and give what eager gives. The compile backend is
"aot_eager" (Dynamo + AOTAutograd with the fake implementations and the registered autograd
formulas, no inductor codegen: seconds instead of minutes on CPU)."""
import pytest
import torch
from batches import make_batch, to

from dqo_kernels import fused_dqo_loss, linear_logprobs
from dqo_kernels._native import load as native
from dqo_kernels.validation import triton_available

BACKENDS = (["torch"] + (["cpp"] if native.is_available() else [])
            + (["triton"] if triton_available() else []))


def pipeline(hidden, weight, targets, ref_logp, values, rewards, mask, behavior_logp,
             bootstrap, backend):
    B, T = mask.shape
    logp = linear_logprobs(hidden, weight, targets, temperature=0.9, chunk_size=8,
                           backend=backend).view(B, T)
    out = fused_dqo_loss(logp, ref_logp, values, rewards, mask, behavior_logp=behavior_logp,
                         bootstrap=bootstrap, lam=0.9, gamma=0.95, is_clip=2.0,
                         target_grad=True, loss_agg="seq-mean-token-mean", backend=backend)
    return out.loss, out.policy_loss, out.returns, out.weights, out.td_error


def inputs(seed=0):
    B, T, D, V = 3, 12, 8, 20
    b = to(make_batch("interleaved", B=B, T=T, seed=seed, garbage=False), torch.float32, "cpu")
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B * T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / 3
    targets = torch.randint(0, V, (B * T,), generator=g)
    targets[~b["mask"].flatten()] = -100
    # ref/behaviour log-probs near the policy's, so the weights stay near 1
    return hidden, weight, targets, b


def run(fn, backend, seed=0):
    hidden, weight, targets, b = inputs(seed)
    leaves = [hidden.requires_grad_(), weight.requires_grad_(),
              b["values"].detach().requires_grad_()]
    outs = fn(leaves[0], leaves[1], targets, b["ref_logp"], leaves[2], b["rewards"], b["mask"],
              b["behavior_logp"], b["bootstrap"], backend)
    grads = torch.autograd.grad(outs[0] + 0.5 * outs[1], leaves)
    return [x.detach() for x in outs], grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_equals_eager(backend):
    torch._dynamo.reset()
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    got, got_grads = run(compiled, backend)
    exp, exp_grads = run(pipeline, backend)
    # the kernel backends run the same launches: bit for bit; the definition ("torch") is
    # differentiated by autograd in the graph instead of by its launcher: fp32 rounding
    tol = dict(rtol=0, atol=0) if backend != "torch" else {}
    for a, e in zip((*got, *got_grads), (*exp, *exp_grads)):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, **tol)


def test_compiled_data_checks_raise_the_eager_message():
    torch._dynamo.reset()

    def loss(logp, ref_logp, values, rewards, mask):
        return fused_dqo_loss(logp, ref_logp, values, rewards, mask).loss

    b = to(make_batch("right", B=2, T=6, seed=1, garbage=False), torch.float32, "cpu")
    with torch.no_grad():
        b["mask"][1, 2] = True
        b["logp"][1, 2] = float("nan")
    args = (b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"])
    with pytest.raises(ValueError) as eager:
        loss(*args)
    with pytest.raises(ValueError) as compiled:
        torch.compile(loss, fullgraph=True, backend="aot_eager")(*args)
    assert str(compiled.value) == str(eager.value)
    assert "logp: expected finite values" in str(eager.value)
