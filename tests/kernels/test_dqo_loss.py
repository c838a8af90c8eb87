"""fused_dqo_loss: every backend against the float64 reference, and the reference against an
independent per-row implementation of docs/math.md §3 and its exact special cases."""
import math

import pytest
import torch
from batches import LAYOUTS, make_batch, stable_seed, to

from dqo_kernels import dqo_scan_reference, dro_loss, fused_dqo_loss, row_scale
from dqo_kernels.validation import triton_available as _triton_available

BACKENDS = ["torch", "cpp"] + (["triton"] if _triton_available() else [])
ON_GPU = torch.cuda.is_available()


# (lam, gamma, is_clip, is_policy, is_value, target_grad, loss_agg)
CONFIGS = [
    (1.0, 1.0, 1.0, True, True, False, "token-mean"),  # the paper's default
    (0.95, 1.0, 2.0, True, True, False, "seq-mean-token-mean"),
    (0.0, 0.9, math.inf, True, False, False, "seq-mean-token-sum"),  # one-step TD
    (0.7, 0.9, 1.5, False, True, True, "token-mean"),
    (1.0, 1.0, 1.0, False, False, True, "seq-mean-token-mean"),
    (0.5, 0.8, math.inf, True, True, True, "token-mean"),
]


def kwargs_of(cfg):
    lam, gamma, is_clip, is_policy, is_value, target_grad, loss_agg = cfg
    return dict(lam=lam, gamma=gamma, is_clip=is_clip, is_policy=is_policy, is_value=is_value,
                target_grad=target_grad, loss_agg=loss_agg, beta=0.3)


def run(batch, backend, **kw):
    out = fused_dqo_loss(batch["logp"], batch["ref_logp"], batch["values"], batch["rewards"],
                         batch["mask"], behavior_logp=batch["behavior_logp"],
                         bootstrap=batch["bootstrap"], backend=backend, **kw)
    g_logp, g_values = torch.autograd.grad(out.loss, [batch["logp"], batch["values"]])
    return out, g_logp, g_values


def assert_matches(batch, backend, tol, **kw):
    ref_batch = to(batch, torch.float64, "cpu")
    exp, e_gl, e_gv = run(ref_batch, "torch", **kw)
    got, g_gl, g_gv = run(batch, backend, **kw)
    mask = ref_batch["mask"]

    def close(name, a, b):
        a = a.detach().double().cpu()
        torch.testing.assert_close(a, b.detach(), **tol, msg=lambda m: f"{name}: {m}")

    close("policy_loss", got.policy_loss, exp.policy_loss)
    close("value_loss", got.value_loss, exp.value_loss)
    close("returns", got.returns, exp.returns)
    close("weights", got.weights, exp.weights)
    close("td_error", got.td_error, exp.td_error)
    close("grad logp", g_gl, e_gl)
    close("grad values", g_gv, e_gv)
    assert (g_gl.cpu()[~mask] == 0).all() and (g_gv.cpu()[~mask] == 0).all()
    for k, v in got.metrics.items():
        torch.testing.assert_close(v.double().cpu(), exp.metrics[k], **tol, equal_nan=True,
                                   msg=lambda m: f"metric {k}: {m}")


FP32 = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS + (["triton-bt16"] if "triton" in BACKENDS else []))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_backend_matches_float64_reference(backend, layout, cfg, device, monkeypatch):
    if backend == "triton-bt16":  # 16-token tiles: every row crosses block boundaries
        from dqo_kernels.dqo_loss import triton as dqo_loss_triton
        monkeypatch.setattr(dqo_loss_triton, "MAX_BLOCK_T", 16)
        backend = "triton"
    seed = stable_seed(layout, cfg)
    batch = to(make_batch(layout, B=5, T=23, seed=seed), torch.float32, device)
    if backend == "cpp" and device.type != "cpu":
        batch = to(batch, device="cpu")
    assert_matches(batch, backend, FP32, **kwargs_of(cfg))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 2), (2, 130)])
def test_edge_shapes(backend, shape, device):
    B, T = shape
    for i, cfg in enumerate((CONFIGS[1], CONFIGS[3])):
        batch = to(make_batch("bernoulli", B, T, seed=17 * B + T + i, empty_row=B > 2),
                   torch.float32, device if backend != "cpp" else "cpu")
        assert_matches(batch, backend, FP32, **kwargs_of(cfg))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, device):
    batch = make_batch("interleaved", B=4, T=19, seed=3, noncontig=True)
    batch = to(batch, torch.float32, device if backend != "cpp" else "cpu")
    assert not batch["mask"].is_contiguous() and not batch["logp"].is_contiguous()
    assert_matches(batch, backend, FP32, **kwargs_of(CONFIGS[3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_empty(backend, device):
    batch = make_batch("right", B=3, T=7, seed=1)
    batch["mask"][:] = False
    batch["rewards"][:] = 0
    batch = to(batch, torch.float32, device if backend != "cpp" else "cpu")
    out, gl, gv = run(batch, backend)
    assert out.loss.item() == 0.0 and (gl == 0).all() and (gv == 0).all()
    assert (out.returns == 0).all() and (out.weights == 0).all()


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3], CONFIGS[5]],
                         ids=lambda c: "-".join(map(str, c)))
def test_triton_multiple_blocks(cfg, device):
    """Rows much longer than the tile: the carries of both passes cross block boundaries."""
    from dqo_kernels.dqo_loss.aggregation import RowScale
    from dqo_kernels.dqo_loss.autograd import run_launcher
    from dqo_kernels.dqo_loss.launch import DQOHyper
    from dqo_kernels.dqo_loss.triton import dqo_loss_forward

    kw = kwargs_of(cfg)
    loss_agg = kw.pop("loss_agg")
    batch = to(make_batch("interleaved", B=3, T=75, seed=11), torch.float32, device)
    ref = to(batch, torch.float64, "cpu")
    scale = row_scale(batch["mask"], loss_agg)

    def launch16(*args):
        return dqo_loss_forward(*args, block_size=16)

    outs = []
    for b, fn in ((batch, launch16), (ref, None)):
        s = scale.to(b["logp"].device, torch.float64 if fn is None else torch.float32)
        args = (b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"])
        if fn is None:
            res = dqo_scan_reference(*args, s, behavior_logp=b["behavior_logp"],
                                     bootstrap=b["bootstrap"], **kw)
        else:
            res = run_launcher(fn, b["logp"], b["ref_logp"], b["values"], b["rewards"],
                               b["mask"], b["behavior_logp"], b["bootstrap"], RowScale.given(s),
                               DQOHyper(**kw))[1]
        grads = torch.autograd.grad(res.policy_loss + res.value_loss, [b["logp"], b["values"]])
        outs.append([x.detach().double().cpu() for x in (*res, *grads)])
    for got, exp in zip(*outs):
        torch.testing.assert_close(got, exp, **FP32)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs(dtype, device):
    """Half inputs are read as they are and computed in fp32: the kernel must agree with the
    float64 reference on the *rounded* inputs to fp32 precision (gradients come back in the
    input dtype, so they get that dtype's tolerance)."""
    batch = to(make_batch("right", B=4, T=21, seed=5), dtype, device)
    ref = to(batch, torch.float64, "cpu")
    exp, e_gl, e_gv = run(ref, "torch", **kwargs_of(CONFIGS[1]))
    got, g_gl, g_gv = run(batch, "triton", **kwargs_of(CONFIGS[1]))
    assert g_gl.dtype == dtype and got.returns.dtype == torch.float32
    torch.testing.assert_close(got.loss.double().cpu(), exp.loss, **FP32)
    torch.testing.assert_close(got.returns.double().cpu(), exp.returns, **FP32)
    half_tol = dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(g_gl.double().cpu(), e_gl, **half_tol)
    torch.testing.assert_close(g_gv.double().cpu(), e_gv, **half_tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_grad", [False, True])
def test_float64_backends_match_reference_tightly(backend, target_grad, device):
    """In float64 the kernels' closed-form gradients equal autograd of the reference to
    near machine precision. (torch.autograd.gradcheck cannot be used: finite differences see
    through the stop-gradients that define the DQO losses.) Triton receives beta, gamma and lam
    as fp32 scalars, hence its looser bound."""
    dev = device if backend != "cpp" else torch.device("cpu")
    b = to(make_batch("interleaved", B=4, T=17, seed=2), torch.float64, dev)
    kw = dict(kwargs_of(CONFIGS[3]), target_grad=target_grad)
    tol = dict(rtol=1e-6, atol=1e-7) if backend == "triton" else dict(rtol=1e-11, atol=1e-12)
    assert_matches(b, backend, tol, **kw)


def test_reference_gradients_follow_spec_3_7():
    """Autograd of the reference equals the closed forms dL/dlogp = beta a w_pi delta and
    dL/dvalues = a w_V delta, which the kernels implement."""
    b = to(make_batch("left", B=4, T=13, seed=6), torch.float64)
    kw = kwargs_of(CONFIGS[1])
    out, gl, gv = run(b, "torch", **kw)
    a = row_scale(b["mask"], kw["loss_agg"], dtype=torch.float64)[:, None]
    torch.testing.assert_close(gl, kw["beta"] * a * out.weights * out.td_error)
    torch.testing.assert_close(gv, a * out.weights * out.td_error)


# ---------------------------------------------------------------------------------------------
# The reference against the equations, written independently, row by row over action lists.


def spec_loss(b, beta, lam, gamma, is_clip, is_policy, is_value, loss_agg):
    """docs/math.md §3.1-3.6 literally: returns (L_pi, L_V, G, w, delta) for a float64 batch."""
    B, T = b["mask"].shape
    G = torch.zeros(B, T, dtype=torch.float64)
    W = torch.zeros(B, T, dtype=torch.float64)
    D = torch.zeros(B, T, dtype=torch.float64)
    beh = b["behavior_logp"] if b["behavior_logp"] is not None else b["ref_logp"]
    n_rows = [int(b["mask"][i].sum()) for i in range(B)]
    n_seq = max(1, sum(n > 0 for n in n_rows))
    l_pi = l_v = 0.0
    for i in range(B):
        acts = torch.nonzero(b["mask"][i]).flatten().tolist()
        boot = float(b["bootstrap"][i]) if b["bootstrap"] is not None else 0.0
        l = {t: float(b["logp"][i, t] - b["ref_logp"][i, t]) for t in acts}
        c = 0.0
        for t in acts:
            c += float(b["logp"][i, t] - beh[i, t])
            W[i, t] = math.exp(min(c, math.log(is_clip)))
        g_next = v_next = boot
        for t in reversed(acts):
            r = float(b["rewards"][i, t])
            v = float(b["values"][i, t])
            target = r + gamma * ((1 - lam) * v_next + lam * g_next)
            G[i, t] = r - beta * l[t] + gamma * ((1 - lam) * v_next + lam * g_next)
            D[i, t] = beta * l[t] + v - target  # docs/math.md §3.5, not V - G
            g_next, v_next = float(G[i, t]), v
        for t in acts:
            if loss_agg == "token-mean":
                a = 1.0 / max(1, sum(n_rows))
            elif loss_agg == "seq-mean-token-mean":
                a = 1.0 / (n_seq * n_rows[i])
            else:
                a = 1.0 / n_seq
            w_pi = float(W[i, t]) if is_policy else 1.0
            w_v = float(W[i, t]) if is_value else 1.0
            l_pi += a * w_pi * 0.5 * float(D[i, t]) ** 2
            l_v += a * w_v * 0.5 * (float(b["values"][i, t]) - float(G[i, t])) ** 2
    return l_pi, l_v, G, W, D


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_spec(layout, cfg):
    kw = kwargs_of(cfg)
    kw.pop("target_grad")
    b = make_batch(layout, B=4, T=15, seed=stable_seed(layout, cfg, "spec"), garbage=False)
    l_pi, l_v, G, W, D = spec_loss(b, **kw)
    out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                         behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"],
                         backend="torch", **kw)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.policy_loss.item(), l_pi, **tol)
    torch.testing.assert_close(out.value_loss.item(), l_v, **tol)
    torch.testing.assert_close(out.returns, G, **tol)
    torch.testing.assert_close(out.weights, W, **tol)
    torch.testing.assert_close(out.td_error, D, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda1_gamma1_is_soft_monte_carlo_return(backend, device):
    """lam = gamma = 1: G_t = sum over actions k >= t of (r_k - beta l_k) + bootstrap."""
    dev = device if backend != "cpp" else "cpu"
    b = to(make_batch("interleaved", B=4, T=17, seed=9, garbage=False), torch.float64, dev)
    out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                         bootstrap=b["bootstrap"], beta=0.2, backend=backend)
    m = b["mask"]
    soft = torch.where(m, b["rewards"] - 0.2 * (b["logp"] - b["ref_logp"]), 0).detach()
    suffix = soft.flip(1).cumsum(1).flip(1) + b["bootstrap"][:, None]
    torch.testing.assert_close(out.returns, torch.where(m, suffix, 0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda0_is_one_step_td(backend, device):
    """lam = 0: G_t = r_t - beta l_t + gamma V(next action state), bootstrap after the last."""
    dev = device if backend != "cpp" else "cpu"
    b = to(make_batch("bernoulli", B=4, T=13, seed=4, garbage=False), torch.float64, dev)
    out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                         bootstrap=b["bootstrap"], beta=0.2, lam=0.0, gamma=0.9,
                         backend=backend)
    exp = torch.zeros_like(out.returns)
    for i in range(4):
        acts = torch.nonzero(b["mask"][i]).flatten().tolist()
        for j, t in enumerate(acts):
            v_next = b["values"][i, acts[j + 1]] if j + 1 < len(acts) else b["bootstrap"][i]
            exp[i, t] = (b["rewards"][i, t] - 0.2 * (b["logp"][i, t] - b["ref_logp"][i, t])
                         + 0.9 * v_next).detach()
    torch.testing.assert_close(out.returns, exp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_grad_is_dro_on_every_suffix(backend, device):
    """docs/math.md §3.8: with lam = gamma = 1 and target_grad, the policy loss at t is exactly the
    DRO loss of the suffix starting at t (summed log-ratio, reward-to-go), gradient included."""
    dev = device if backend != "cpp" else "cpu"
    b = to(make_batch("interleaved", B=4, T=14, seed=21, garbage=False), torch.float64, dev)
    beta = 0.25
    out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                         bootstrap=b["bootstrap"], beta=beta, target_grad=True,
                         is_clip=math.inf, backend=backend)
    (g_kernel,) = torch.autograd.grad(out.policy_loss, b["logp"])

    logp = b["logp"].detach().clone().requires_grad_(True)
    m = b["mask"]
    l = torch.where(m, logp - b["ref_logp"], 0)
    r = torch.where(m, b["rewards"], 0)
    suffix = lambda x: x.flip(1).cumsum(1).flip(1)  # noqa: E731
    w = out.weights  # no gradient, as in the loss
    dro = beta * suffix(l) + b["values"].detach() - suffix(r) - b["bootstrap"][:, None]
    a = 1.0 / m.sum()
    loss = torch.where(m, a * w * 0.5 * dro.square(), 0).sum()
    (g_dro,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(out.policy_loss, loss.detach())
    torch.testing.assert_close(g_kernel, g_dro)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_dro_is_the_one_action_case(backend, weighted, device):
    dev = device if backend != "cpp" else "cpu"
    g = torch.Generator().manual_seed(0)
    B = 6
    logp = (-20 * torch.rand(B, generator=g, dtype=torch.float64)).to(dev).requires_grad_()
    ref = logp.detach() + torch.randn(B, generator=g, dtype=torch.float64).to(dev)
    beh = logp.detach() + torch.randn(B, generator=g, dtype=torch.float64).to(dev)
    v = torch.randn(B, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    r = (torch.rand(B, generator=g) < 0.5).double().to(dev)
    beta = 0.1
    out = dro_loss(logp, ref, v, r, behavior_logp=beh, beta=beta, is_policy=weighted,
                   is_value=weighted, backend=backend)
    grads = torch.autograd.grad(out.loss, [logp, v])
    # The same through the [B, 1] DQO path ...
    h1 = fused_dqo_loss(logp[:, None], ref[:, None], v[:, None], r[:, None],
                        torch.ones(B, 1, dtype=torch.bool, device=dev),
                        behavior_logp=beh[:, None], beta=beta, is_policy=weighted,
                        is_value=weighted, gamma=0.37, lam=0.5, backend=backend)
    torch.testing.assert_close(out.loss, h1.loss)
    for x, y in zip(grads, torch.autograd.grad(h1.loss, [logp, v])):
        torch.testing.assert_close(x, y)
    # ... and the published closed form (Richemond et al. 2024, eq. for L_DRO).
    w = torch.exp(torch.clamp(logp.detach() - beh, max=0.0)) if weighted else torch.ones_like(r)
    l = logp - ref
    closed = (w * 0.5 * (r - v.detach() - beta * l) ** 2).mean() \
        + (w * 0.5 * (r - beta * l.detach() - v) ** 2).mean()
    torch.testing.assert_close(out.loss, closed)
    for x, y in zip(grads, torch.autograd.grad(closed, [logp, v])):
        torch.testing.assert_close(x, y)
    assert out.returns.shape == (B,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_columns_are_pass_through(backend, device):
    """Inserting non-action columns anywhere (prompt, tool output, padding), holding anything,
    changes neither the losses nor the gradients on the actions."""
    dev = device if backend != "cpp" else "cpu"
    dense = make_batch("right", B=3, T=10, seed=8, garbage=False, empty_row=False)
    dense["mask"][:] = True
    dense["rewards"][:, -1] = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(25, generator=g) < 0.4
    while int(keep.sum()) != 10:
        keep = torch.rand(25, generator=g) < 0.4
    sparse = {}
    for k, x in dense.items():
        if x is None or x.dim() != 2:
            sparse[k] = x
            continue
        y = torch.full((3, 25), float("nan"), dtype=torch.float64) if x.is_floating_point() \
            else torch.zeros(3, 25, dtype=x.dtype)
        y[:, keep] = x
        sparse[k] = y
    sparse["rewards"] = torch.nan_to_num(sparse["rewards"], nan=0.0)
    kw = kwargs_of(CONFIGS[3])
    outs = []
    for batch in (dense, sparse):
        b = to(batch, torch.float64, dev)
        out, gl, gv = run(b, backend, **kw)
        outs.append((out.loss, out.returns.cpu(), gl.cpu(), gv.cpu()))
    (l1, r1, gl1, gv1), (l2, r2, gl2, gv2) = outs
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(r2[:, keep], r1)
    torch.testing.assert_close(gl2[:, keep], gl1)
    torch.testing.assert_close(gv2[:, keep], gv1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_tokens_makes_micro_batches_exact(backend, device):
    """Summing micro-batch losses computed with the global token count reproduces the full
    batch's token-mean loss and gradients (gradient accumulation / data parallelism)."""
    dev = device if backend != "cpp" else "cpu"
    full = to(make_batch("right", B=6, T=12, seed=30), torch.float64, dev)
    out, gl, gv = run(full, backend)
    n = int(full["mask"].sum())
    loss = 0.0
    g_l, g_v = torch.zeros_like(gl), torch.zeros_like(gv)
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = {k: (x[rows].detach().clone() if x is not None else None) for k, x in full.items()}
        part = to(part, device=dev)
        o, a, b = run(part, backend, num_tokens=n)
        loss += o.loss.item()
        g_l[rows], g_v[rows] = a, b
    torch.testing.assert_close(loss, out.loss.item(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_l, gl)
    torch.testing.assert_close(g_v, gv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_and_value_losses_backward_separately(backend, device):
    """One engine per model: policy_loss.backward() then value_loss.backward(), no
    retain_graph, gives the same gradients as loss.backward()."""
    dev = device if backend != "cpp" else "cpu"
    b = to(make_batch("right", B=3, T=9, seed=4, garbage=False), torch.float32, dev)
    _, gl, gv = run(b, backend)
    # each input the output of a "model" whose graph saves tensors (freed by its backward)
    s_pi = torch.ones((), device=dev, requires_grad=True)
    s_v = torch.ones((), device=dev, requires_grad=True)
    logp, values = b["logp"].detach() * s_pi, b["values"].detach() * s_v
    out = fused_dqo_loss(logp, b["ref_logp"], values, b["rewards"], b["mask"],
                         behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"],
                         backend=backend)
    out.policy_loss.backward()
    out.value_loss.backward()
    torch.testing.assert_close(s_pi.grad, (gl * b["logp"].detach()).sum())
    torch.testing.assert_close(s_v.grad, (gv * b["values"].detach()).sum())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_retained_graph_backward_twice(backend, device):
    """The kernel backends hand their gradient buffers to autograd on the first backward; a
    second backward through the retained graph recomputes them (equal to the first), and the
    first gradient, kept as .grad, is never changed by it."""
    dev = device if backend != "cpp" else "cpu"
    b = to(make_batch("interleaved", B=3, T=21, seed=8), torch.float32, dev)
    kw = kwargs_of(CONFIGS[3])
    out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                         behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"],
                         backend=backend, **kw)
    g1 = torch.autograd.grad(out.loss, [b["logp"], b["values"]], retain_graph=True)
    first = [g.clone() for g in g1]
    for g in g1:
        g.mul_(3.0)  # what an optimiser may do to a stolen .grad
    g2 = torch.autograd.grad(2 * out.loss, [b["logp"], b["values"]], retain_graph=True)
    for a, f in zip(g2, first):
        torch.testing.assert_close(a, 2 * f)
    out.policy_loss.backward(retain_graph=True)
    out.value_loss.backward(retain_graph=True)
    torch.testing.assert_close(b["logp"].grad, first[0])
    torch.testing.assert_close(b["values"].grad, first[1])
    with torch.no_grad():
        b["ref_logp"].add_(0.0)  # an in-place change of an input: a recompute must refuse
    with pytest.raises(RuntimeError, match="modified in place"):
        out.loss.backward()


def test_on_policy_weights_are_one():
    """At initialisation pi_theta = pi_ref = behaviour: every weight is 1, no clipping."""
    b = make_batch("left", B=3, T=9, seed=2, behavior=False, garbage=False)
    out = fused_dqo_loss(b["ref_logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                         backend="torch")
    m = b["mask"]
    assert torch.equal(out.weights[m], torch.ones(int(m.sum()), dtype=torch.float64))
    torch.testing.assert_close(out.metrics["is_ess"].item(), 1.0)
    assert out.metrics["is_weight_clip_frac"].item() == 0.0  # at the cap, not above it


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_frac_counts_weights_above_the_cap_beyond_rounding(backend, device):
    """A weight equal to the cap C = 1 (pi_theta = pi_beta) or above it by a few ulps of the
    log-probs is not clipped; one above it by more is."""
    dev = device if backend != "cpp" else "cpu"
    b = to(make_batch("interleaved", B=4, T=12, seed=21, garbage=False), torch.float32, dev)
    m, logp = b["mask"], b["logp"].detach()

    def clip_frac(behavior_logp, is_clip):
        out = run({**b, "behavior_logp": behavior_logp}, backend, is_clip=is_clip)[0]
        return out.weights, out.metrics["is_weight_clip_frac"].item()

    assert clip_frac(logp.clone(), 1.0)[1] == 0.0
    ulp_below = torch.nextafter(logp, torch.full_like(logp, -math.inf))  # c_t = a few ulps
    weights, frac = clip_frac(ulp_below, 1.0)
    assert (weights[m] == 1.0).all() and frac == 0.0
    below = logp - 1e-3  # c_t = 1e-3 times the number of actions up to t
    assert clip_frac(below, 1.0)[1] == 1.0
    c = torch.cumsum((logp - below) * m, dim=1)[m]
    exp = (c > 2.5e-3).double().mean().item()  # every c_t is 5e-4 or more away from log C
    assert 0 < exp < 1
    assert clip_frac(below, math.exp(2.5e-3))[1] == pytest.approx(exp)


def test_metrics_match_direct_computation():
    b = make_batch("interleaved", B=5, T=16, seed=12, garbage=False)
    out = fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                         behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"],
                         is_clip=1.2, backend="torch")
    m = b["mask"]
    G, V, D, W = out.returns[m], b["values"][m], out.td_error[m], out.weights[m]
    C = torch.cumsum(torch.where(m, b["logp"] - b["behavior_logp"], 0.0), dim=1)
    assert ((C[m] - math.log(1.2)).abs() > 1e-6).all()  # no c_t within rounding of the cap
    exp = {
        "return_mean": G.mean(), "value_mean": V.mean(),
        "value_explained_var": 1 - (G - V).var(unbiased=False) / G.var(unbiased=False),
        "td_abs_mean": D.abs().mean(), "td_abs_max": D.abs().max(),
        "log_ratio_mean": (b["logp"] - b["ref_logp"])[m].mean(), "is_weight_mean": W.mean(),
        "kl": (lambda r: (torch.exp(-r) - 1 + r).mean())((b["logp"] - b["ref_logp"])[m]),
        "is_weight_clip_frac": (C[m] > math.log(1.2)).double().mean(),
        "is_ess": W.sum() ** 2 / (W.square().sum() * len(W)),
        "num_tokens": torch.tensor(float(len(W)), dtype=torch.float64),
    }
    assert set(out.metrics) == set(exp)
    for k, v in exp.items():
        torch.testing.assert_close(out.metrics[k], v, msg=lambda s: f"{k}: {s}")
    assert all(not v.requires_grad for v in out.metrics.values())


def test_combines_are_associative():
    """The interpreter folds scans left to right, so it cannot catch a non-associative
    combine; compiled Triton scans as a tree. Check the algebra directly."""
    import numpy as np
    pytest.importorskip("triton")
    from dqo_kernels.dqo_loss.triton import _compose_affine, _compose_lambda

    rng = np.random.default_rng(0)
    for fn, k in ((_compose_lambda.fn, 5), (_compose_affine.fn, 2)):
        x, y, z = (tuple(rng.normal(size=64) for _ in range(k)) for _ in range(3))
        left = fn(*fn(*x, *y), *z)
        right = fn(*x, *fn(*y, *z))
        for a, b in zip(left, right):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_input_dtypes_compute_in_the_widest(backend, device):
    """fp32 log-probs with fp64 values: every backend computes (and returns) in float64."""
    dev = device if backend != "cpp" else "cpu"
    b = to(make_batch("right", B=3, T=9, seed=13), torch.float32, dev)
    b["values"] = b["values"].detach().double().requires_grad_()
    out, gl, gv = run(b, backend)
    assert out.returns.dtype == torch.float64 and out.loss.dtype == torch.float64
    assert gl.dtype == torch.float32 and gv.dtype == torch.float64
    ref, rgl, rgv = run(to(b, torch.float64, "cpu"), "torch")
    torch.testing.assert_close(out.loss.cpu(), ref.loss, **FP32)
