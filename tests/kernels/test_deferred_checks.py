"""The CUDA path of the data checks, selected on CPU (issue 24 item 3): during the call no
value is read on the host; the flags are read when asked for (``out.check()``, the first
metric, ``check_pending()``) or at the next call, and raise the errors an immediate check
raises, with the same messages."""
import contextlib

import pytest
import torch
from batches import make_batch, to

from dqo_kernels import (
    check_pending,
    fused_dqo_loss,
    linear_logprobs,
    set_data_checks,
    token_logprobs,
    validation,
)
from dqo_kernels.validation import triton_available

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@pytest.fixture
def deferred(monkeypatch):
    """The device-side path, as on CUDA."""
    check_pending()
    monkeypatch.setattr(validation, "_defer_override", True)
    yield
    validation._pending.clear()


@contextlib.contextmanager
def no_host_reads():
    """Fail on any read of a tensor's values on the host (what synchronises a GPU)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbid(name):
        def read(*args, **kwargs):
            raise AssertionError(f"host read during the call: Tensor.{name}")
        return read
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, forbid(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def batch(dtype=torch.float32):
    b = to(make_batch("right", B=3, T=10, seed=4, garbage=False), dtype, "cpu")
    with torch.no_grad():
        b["mask"][1, 2:5] = True
        b["rewards"][1, :2] = 0.0
    return b


def call(b, backend, **kw):
    return fused_dqo_loss(b["logp"], b["ref_logp"], b["values"], b["rewards"], b["mask"],
                          behavior_logp=b["behavior_logp"], bootstrap=b["bootstrap"],
                          backend=backend, **kw)


def nan_logp(b):
    b["logp"][1, 3] = float("nan")


def positive_ref(b):
    b["ref_logp"][1, 4] = 0.5


def reward_off_mask(b):
    b["rewards"][1, 0] = 2.0


def bad_mask(b):
    b["mask"] = b["mask"].to(torch.int64)
    b["mask"][0, 0] = 3


def overflowing_weights(b):
    b["behavior_logp"][1, 2:5] = -200.0


def inf_values(b):
    b["values"][1, 4] = float("inf")


def nan_reward_off_mask(b):
    b["rewards"][1, 1] = float("nan")


def nan_reward(b):
    b["rewards"][1, 3] = float("nan")


def positive_logp(b):
    b["logp"][1, 2] = 0.01


def nan_behavior(b):
    b["behavior_logp"][1, 3] = float("nan")


def positive_behavior(b):
    b["behavior_logp"][1, 3] = 0.2


def nan_bootstrap(b):
    b["bootstrap"][2] = float("nan")


BAD = [(nan_logp, {}), (positive_ref, {}), (reward_off_mask, {}), (bad_mask, {}),
       (overflowing_weights, {"is_clip": float("inf")}), (inf_values, {}),
       (nan_reward_off_mask, {}), (nan_reward, {}), (positive_logp, {}), (nan_behavior, {}),
       (positive_behavior, {}), (nan_bootstrap, {})]


def immediate_error(b, backend, **kw):
    with pytest.raises(ValueError) as err:
        call(b, backend, **kw)
    return str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_batch_no_host_read_and_same_results(backend, deferred, monkeypatch):
    b = batch()
    with no_host_reads():
        out = call(b, backend)
    assert out.pending_checks
    out.check()
    monkeypatch.setattr(validation, "_defer_override", False)
    exp = call(b, backend)
    for a, e in ((out.loss, exp.loss), (out.returns, exp.returns), (out.weights, exp.weights)):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("corrupt,kw", BAD, ids=[f.__name__ for f, _ in BAD])
def test_bad_batch_raises_when_read_with_the_same_message(backend, corrupt, kw, deferred,
                                                          monkeypatch):
    b = batch()
    with torch.no_grad():
        corrupt(b)
    monkeypatch.setattr(validation, "_defer_override", False)
    message = immediate_error(b, backend, **kw)
    monkeypatch.setattr(validation, "_defer_override", True)
    with no_host_reads():
        out = call(b, backend, **kw)  # no error yet: nothing was read
    with pytest.raises(ValueError) as err:
        out.check()
    assert str(err.value) == message
    out.check()  # read once


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_metric_and_next_call_read_the_flags(backend, deferred, monkeypatch):
    b = batch()
    with torch.no_grad():
        nan_logp(b)
    monkeypatch.setattr(validation, "_defer_override", False)
    message = immediate_error(b, backend)
    monkeypatch.setattr(validation, "_defer_override", True)
    out = call(b, backend)
    with pytest.raises(ValueError, match="logp: expected finite values") as err:
        out.metrics["kl"]
    assert str(err.value) == message
    call(b, backend)  # a second bad call: its flags wait for the next one
    with pytest.raises(ValueError) as err:
        call(batch(), backend)
    assert str(err.value) == message
    call(batch(), backend).check()  # nothing pending any more


def test_token_and_linear_logprobs_defer_the_target_check(deferred, monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g)
    targets = torch.tensor([1, 2, 9, -100])
    monkeypatch.setattr(validation, "_defer_override", False)
    with pytest.raises(ValueError) as err:
        token_logprobs(logits, targets, backend="torch")
    message = str(err.value)
    monkeypatch.setattr(validation, "_defer_override", True)
    backends = ["torch"] + (["triton"] if triton_available() else [])
    for backend in backends:
        with no_host_reads():
            token_logprobs(logits, targets, backend=backend)
        with pytest.raises(ValueError) as err:
            check_pending()
        assert str(err.value) == message
        h, w = torch.randn(4, 3, generator=g), torch.randn(9, 3, generator=g)
        with no_host_reads():
            linear_logprobs(h, w, targets, backend=backend)
        with pytest.raises(ValueError) as err:
            check_pending()
        assert str(err.value) == message


def test_checks_off_defer_nothing(deferred):
    b = batch()
    with torch.no_grad():
        nan_logp(b)
    set_data_checks(False)
    try:
        out = call(b, "torch")
    finally:
        set_data_checks(True)
    assert out.pending_checks == () and not validation._pending


def test_cpu_default_still_raises_in_the_call():
    assert validation._defer_override is None and not validation.defer_checks(
        torch.device("cpu")) and validation.defer_checks(torch.device("cuda"))
    b = batch()
    with torch.no_grad():
        nan_logp(b)
    with pytest.raises(ValueError, match="logp: expected finite values"):
        call(b, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_guard_sees_the_immediate_checks_host_read(backend):
    """The guard above is not vacuous: the immediate (CPU) checks read their flags."""
    b = batch()
    with pytest.raises(AssertionError, match="host read during the call"):
        with no_host_reads():
            call(b, backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_defers_by_default_and_raises_on_check():
    b = to(batch(), torch.float32, "cuda")
    with torch.no_grad():
        b["logp"][1, 3] = float("nan")
    out = call(b, "triton")
    assert out.pending_checks
    with pytest.raises(ValueError, match="logp: expected finite values"):
        out.check()


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_checks_ride_in_the_kernel(deferred, monkeypatch):
    """On the Triton path the kernel flags its rows; the tensor-op checks run only when a
    set flag is read (a good batch never builds them), and a false alarm raises nothing."""
    from dqo_kernels.dqo_loss import checks as loss_checks_module
    calls = []
    real = loss_checks_module.value_checks
    monkeypatch.setattr(loss_checks_module, "value_checks",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out = call(batch(), "triton")
    out.check()
    assert calls == []
    b = batch()
    with torch.no_grad():
        nan_logp(b)
    out = call(b, "triton")
    assert calls == []
    with pytest.raises(ValueError, match="logp: expected finite values"):
        out.check()
    assert calls == [1]
    b = batch()
    with torch.no_grad():
        b["logp"][1, 3] = 5e-3  # above the kernel's 1e-3 flag, within bf16's tolerance
    b = {k: (v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v)
         for k, v in b.items()}
    out = call(b, "triton")
    out.check()  # the flag was set, the exact checks find nothing
    assert calls == [1, 1]
