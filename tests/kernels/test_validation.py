"""Bad input raises a ValueError naming the argument, what was expected and what was given."""
import math

import pytest
import torch
from batches import make_batch

import dqo_kernels
import dqo_kernels.logprobs.core as logprobs_core
from dqo_kernels import dro_loss, fused_dqo_loss
from dqo_kernels._native import load as native
from dqo_kernels.validation import triton_available

BACKENDS = (["torch"] + (["cpp"] if native.is_available() else [])
            + (["triton"] if triton_available() else []))


def call(**over):
    b = make_batch("right", B=3, T=8, seed=0, garbage=False, empty_row=False)
    b = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in b.items()}
    args = {k: b[k] for k in ("logp", "ref_logp", "values", "rewards", "mask")}
    kw = {"behavior_logp": b["behavior_logp"], "bootstrap": b["bootstrap"], "backend": "torch"}
    for k, v in over.items():
        if callable(v):
            v = v(b)
        (args if k in args else kw)[k] = v
    return fused_dqo_loss(*args.values(), **kw)


def nan_on_action(b):
    x = b["logp"].clone()
    x[b["mask"]] = torch.nan
    return x


def positive_on_action(name, value):
    def make(b):
        x = b[name].clone()
        x[1, torch.nonzero(b["mask"][1])[0, 0]] = value
        return x
    return make


def reward_off_mask(b):
    r = b["rewards"].clone()
    r[~b["mask"]] = 1.0
    return r


CASES = [
    (dict(logp=[[0.0]]), r"logp: expected a torch.Tensor, got list"),
    (dict(logp=lambda b: b["logp"][0]), r"logp: expected a \[B, T\] tensor, got shape \(8,\)"),
    (dict(ref_logp=lambda b: b["ref_logp"][:, :5]),
     r"ref_logp: expected shape \(3, 8\), got shape \(3, 5\)"),
    (dict(values=lambda b: b["values"].long()), r"values: expected a floating-point tensor"),
    (dict(rewards=lambda b: b["rewards"].to("meta")), r"rewards: expected a tensor on cpu"),
    (dict(mask=lambda b: b["mask"][:2]), r"mask: expected shape \(3, 8\), got shape \(2, 8\)"),
    (dict(mask=lambda b: b["mask"].long() * 2), r"mask: expected only 0/1 values, got 2"),
    (dict(behavior_logp=lambda b: b["logp"].T), r"behavior_logp: expected shape \(3, 8\)"),
    (dict(bootstrap=lambda b: torch.zeros(3, 1)), r"bootstrap: expected shape \(3,\)"),
    (dict(bootstrap=lambda b: torch.tensor([0.0, math.inf, 0.0])),
     r"bootstrap: expected finite values, got inf at index \(1,\)"),
    (dict(logp=nan_on_action), r"logp: expected finite values, got nan .* on an action"),
    (dict(values=lambda b: b["values"].masked_fill(b["mask"], math.inf)),
     r"values: expected finite"),
    (dict(rewards=reward_off_mask), r"rewards: expected 0 on positions where mask is 0"),
    (dict(logp=positive_on_action("logp", 0.5)),
     r"logp: expected log-probs <= 0 \(up to 0.001 of rounding for torch.float32\), got 0.5 "
     r"at index \(1, \d+\) on an action position"),
    (dict(ref_logp=positive_on_action("ref_logp", 2.0)),
     r"ref_logp: expected log-probs <= 0 .*, got 2.0 at index \(1, \d+\) on an action"),
    (dict(behavior_logp=positive_on_action("behavior_logp", 0.002)),
     r"behavior_logp: expected log-probs <= 0 .*, got 0.002"),
    (dict(beta=0.0), r"beta: expected a value in \(0.0, inf\), got 0.0"),
    (dict(beta=math.inf), r"beta: expected a value in \(0.0, inf\), got inf"),
    (dict(beta=-1.0), r"beta: expected a value in \(0.0, inf\), got -1.0"),
    (dict(beta=math.nan), r"beta: expected a real number, got nan"),
    (dict(beta="0.1"), r"beta: expected a real number, got '0.1'"),
    (dict(lam=1.5), r"lam: expected a value in \[0.0, 1.0\], got 1.5"),
    (dict(lam=-0.1), r"lam: expected a value in \[0.0, 1.0\], got -0.1"),
    (dict(gamma=0.0), r"gamma: expected a value in \(0.0, 1.0\]"),
    (dict(gamma=1.01), r"gamma: expected a value in \(0.0, 1.0\], got 1.01"),
    (dict(is_clip=0.5), r"is_clip: expected a value in \[1.0, inf\], got 0.5"),
    (dict(is_clip=math.nan), r"is_clip: expected a real number, got nan"),
    (dict(loss_agg="mean"), r"loss_agg: expected one of .*token-mean.*, got 'mean'"),
    (dict(num_tokens=0), r"num_tokens: expected a value in \[1.0, inf\), got 0.0"),
    (dict(num_tokens=0.5), r"num_tokens: expected a value in \[1.0, inf\), got 0.5"),
    (dict(num_tokens=math.inf), r"num_tokens: expected a value in \[1.0, inf\), got inf"),
    (dict(num_tokens=torch.tensor(math.nan)), r"num_tokens: expected a real number, got nan"),
    (dict(num_tokens=5, loss_agg="seq-mean-token-sum"),
     r"num_tokens: only applies to loss_agg='token-mean'"),
    (dict(backend="cuda"), r"backend: expected None or one of"),
]


@pytest.mark.parametrize("over,message", CASES, ids=[m[:40] for _, m in CASES])
def test_bad_input_names_the_argument(over, message):
    with pytest.raises(ValueError, match=message):
        call(**over)


def test_hyper_parameters_at_the_edges_of_their_ranges_are_accepted():
    for over in (dict(lam=0.0, gamma=1.0, is_clip=math.inf, beta=1e6), dict(num_tokens=1),
                 dict(num_tokens=torch.tensor(12.5)), dict(lam=1.0, gamma=1e-3, is_clip=1.0)):
        assert torch.isfinite(call(**over).loss)


def test_log_probs_within_rounding_of_zero_or_off_the_mask_are_accepted():
    out = call(logp=positive_on_action("logp", 5e-4),
               ref_logp=lambda b: b["ref_logp"].masked_fill(~b["mask"], 3.0))
    assert torch.isfinite(out.loss)
    b = make_batch("right", B=3, T=8, seed=0, garbage=False, empty_row=False)
    lp = b["logp"].bfloat16()
    lp[b["mask"]] = 0.0625  # bf16 arithmetic rounds a logsumexp of ~10 by that much
    fused_dqo_loss(lp, b["ref_logp"].bfloat16(), b["values"], b["rewards"], b["mask"],
                   backend="torch")
    lp[b["mask"]] = 0.25
    with pytest.raises(ValueError, match=r"logp: expected log-probs <= 0 \(up to 0.125 of "
                                         r"rounding for torch.bfloat16\), got 0.25"):
        fused_dqo_loss(lp, b["ref_logp"].bfloat16(), b["values"], b["rewards"], b["mask"],
                       backend="torch")


def test_dro_checks_its_own_arguments():
    x = -torch.rand(3)
    for kw, message in ((dict(beta=math.inf), r"beta: expected a value in \(0.0, inf\)"),
                        (dict(num_sequences=0.5), r"num_sequences: expected a value in \[1.0, "
                                                  r"inf\), got 0.5"),
                        (dict(is_clip=0.9), r"is_clip: expected a value in \[1.0, inf\]")):
        with pytest.raises(ValueError, match=message):
            dro_loss(x, x, torch.zeros(3), torch.zeros(3), **kw)


def diverging_batch(behavior_logp, T=8, dtype=torch.float32):
    """One row of T actions, each with logp - behavior_logp = -1 - behavior_logp."""
    logp = torch.full((1, T), -1.0, dtype=dtype, requires_grad=True)
    values = torch.zeros(1, T, dtype=dtype, requires_grad=True)
    rewards = torch.zeros(1, T, dtype=dtype)
    rewards[0, -1] = 1.0
    mask = torch.ones(1, T, dtype=torch.bool)
    beh = torch.full((1, T), float(behavior_logp), dtype=dtype)
    return logp, logp.detach().clone(), values, rewards, mask, beh


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("behavior_logp,c_max", [(-200.0, "1592"), (-1e4, "79992")])
def test_overflowing_importance_weights_name_is_clip(backend, behavior_logp, c_max):
    """Untruncated weights exp(c_t) beyond fp32 made the loss inf or NaN, silently."""
    logp, ref, values, rewards, mask, beh = diverging_batch(behavior_logp)
    with pytest.raises(ValueError, match=rf"is_clip: expected a cap that keeps the importance "
                                         rf"weights finite in torch.float32 \(log C <= 88.72\)"
                                         rf".*got is_clip=inf.*log-weight c_t = .* is "
                                         rf"{c_max} at index \(0, 7\)"):
        fused_dqo_loss(logp, ref, values, rewards, mask, behavior_logp=beh, is_clip=math.inf,
                       backend=backend)
    with pytest.raises(ValueError, match=r"is_clip: .*got is_clip=1e\+300"):
        fused_dqo_loss(logp, ref, values, rewards, mask, behavior_logp=beh, is_clip=1e300,
                       backend=backend)
    for kw in (dict(is_clip=1e30), dict(is_policy=False, is_value=False)):
        out = fused_dqo_loss(logp, ref, values, rewards, mask, behavior_logp=beh,
                             backend=backend, **{"is_clip": math.inf, **kw})
        out.loss.backward()  # a cap that fits, or weights that are never applied: no error
        assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
        logp.grad = values.grad = None


def test_importance_weight_limit_is_that_of_the_compute_dtype():
    """c_t = 100 overflows fp32 but not fp64; without the data checks the loss is inf."""
    logp, ref, values, rewards, mask, beh = diverging_batch(-13.5)  # c_7 = 100
    with pytest.raises(ValueError, match=r"is_clip: .* is 100 at index \(0, 7\)"):
        fused_dqo_loss(logp, ref, values, rewards, mask, behavior_logp=beh, is_clip=math.inf,
                       backend="torch")
    out = fused_dqo_loss(logp, ref, values.double(), rewards, mask, behavior_logp=beh,
                         is_clip=math.inf, backend="torch")
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float64
    dqo_kernels.set_data_checks(False)
    try:
        out = fused_dqo_loss(logp, ref, values, rewards, mask, behavior_logp=beh,
                             is_clip=math.inf, backend="torch")
        assert not torch.isfinite(out.loss)  # documented: no check, no truncation
    finally:
        dqo_kernels.set_data_checks(True)


def test_garbage_off_the_mask_is_not_an_error():
    out = call(logp=lambda b: b["logp"].masked_fill(~b["mask"], math.nan),
               values=lambda b: b["values"].masked_fill(~b["mask"], math.inf))
    assert torch.isfinite(out.loss)


def test_data_checks_can_be_disabled():
    dqo_kernels.set_data_checks(False)
    try:
        out = call(logp=nan_on_action)  # no error: the caller opted out of value checks
        assert torch.isnan(out.loss)
    finally:
        dqo_kernels.set_data_checks(True)


def test_cpp_backend_rejects_cuda_and_triton_needs_gpu_or_interpreter(monkeypatch):
    from dqo_kernels import resolve_backend
    with pytest.raises(ValueError, match="backend: 'cpp' needs CPU tensors, got tensors on meta"):
        resolve_backend("cpp", torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if dqo_kernels.validation.triton_available():
        with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors"):
            resolve_backend("triton", torch.device("cpu"))


def test_auto_backend_on_cpu_is_native_or_reference():
    assert dqo_kernels.resolve_backend(None, torch.device("cpu")) in ("cpp", "torch")


def test_dro_rejects_token_level_tensors():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"logp: expected shape \[B\] or \[B, 1\], got \(3, 4\)"):
        dro_loss(x, x, x, x)


def test_no_compiler_falls_back_to_the_reference_with_one_warning(monkeypatch, tmp_path):
    from dqo_kernels import resolve_backend, token_logprobs
    from dqo_kernels._native import load as native
    from dqo_kernels.logprobs import chunked

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(native.is_available, "_warned", False, raising=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("DQO_KERNELS_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("DQO_KERNELS_FORCE_JIT", "1")  # nor prebuilt
    with pytest.warns(RuntimeWarning, match="native CPU kernels could not be built.*could not "
                                            "run the compiler.*falling back to PyTorch"):
        assert resolve_backend(None, torch.device("cpu")) == "torch"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        assert resolve_backend(None, torch.device("cpu")) == "torch"
        out = call(backend=None)
        assert logprobs_core._impl(None, torch.device("cpu")) is chunked
        lp = token_logprobs(torch.randn(3, 5), torch.tensor([0, 4, 2]))
    assert torch.isfinite(out.loss) and torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="backend: 'cpp' needs the native CPU kernels"):
        token_logprobs(torch.randn(3, 5), torch.tensor([0, 4, 2]), backend="cpp")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_token_ids_of_a_dtype_that_wraps_are_refused(dtype):
    """uint8 targets read id 156 as ignore_index=-100 (log-prob 0, no gradient, silently);
    int16 cannot hold a 151k vocabulary. Every way in refuses them, naming the argument."""
    from dqo_kernels import (
        action_logprobs,
        action_logprobs_from_logits,
        linear_logprobs,
        token_logprobs,
    )
    V, D = 200, 8
    ids = torch.tensor([3, 156, 7])
    logits, hidden, weight = torch.randn(3, V), torch.randn(3, D), torch.randn(V, D)
    wraps = rf"expected token ids of dtype torch.int64 or torch.int32, got dtype {dtype}; it wraps"
    with pytest.raises(ValueError, match=rf"^targets: {wraps}"):
        token_logprobs(logits, ids.to(dtype))
    with pytest.raises(ValueError, match=rf"^targets: {wraps}"):
        linear_logprobs(hidden, weight, ids.to(dtype))
    mask = torch.tensor([[False, True, True]])
    with pytest.raises(ValueError, match=rf"^input_ids: {wraps}"):
        action_logprobs(hidden[None], weight, ids[None].to(dtype), mask)
    with pytest.raises(ValueError, match=rf"^input_ids: {wraps}"):
        action_logprobs_from_logits(logits[None], ids[None].to(dtype), mask)
    for ok in (torch.int32, torch.int64):  # the id 156 is read as itself
        lp = token_logprobs(logits, ids.to(ok))
        assert torch.allclose(lp, torch.log_softmax(logits, -1)[torch.arange(3), ids])
