"""Input checks for the public ops: every error is a ValueError that names the argument, what
was expected and what was given.

Shape, dtype, device and hyper-parameter checks are free. The data checks (finite values, a
0/1 mask, log-probs <= 0, no reward off the mask, importance weights that fit the compute dtype)
read the tensors. On CPU they run during the call (a failure raises there). On CUDA they are
computed on the device into a flag tensor that the call does not read (no host
synchronisation, nothing that blocks CUDA graphs): the flags are read, and the same errors
raised, when asked for (``out.check()`` of :func:`fused_dqo_loss`'s output, its first metric,
:func:`check_pending`) or at the start of the next call of any op. They are on by default
and can be turned off with ``dqo_kernels.set_data_checks(False)`` or
``DQO_KERNELS_DATA_CHECKS=0``.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

_data_checks = os.environ.get("DQO_KERNELS_DATA_CHECKS", "1") != "0"


def set_data_checks(enabled: bool) -> None:
    """Turn the value checks (NaN/inf, mask values, log-probs <= 0, rewards off the mask,
    overflowing importance weights) on or off."""
    global _data_checks
    _data_checks = bool(enabled)


def data_checks_enabled() -> bool:
    return _data_checks


# Which devices keep the data checks' flags on the device, read later (see the module doc):
# CUDA. The tests select that path on CPU with this switch (True / False / None: by device).
_defer_override: Optional[bool] = None


def defer_checks(device: torch.device) -> bool:
    """Whether the data checks of a call on ``device`` are deferred (flags kept on device)."""
    if _defer_override is not None:
        return _defer_override
    return device.type == "cuda"


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x, *, shape: Optional[Sequence[int]] = None, floating: bool = True,
                 device: Optional[torch.device] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_describe(x)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {_describe(x)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of logp), "
                         f"got {_describe(x)}")


# token ids' dtypes: every vocabulary and ignore_index fit (a narrower integer wraps)
TOKEN_ID_DTYPES = (torch.int64, torch.int32)


def check_token_ids(name: str, ids: torch.Tensor) -> None:
    """Refuse token ids of a dtype other than int64 / int32: uint8 reads id 156 as -100
    (ignore_index: log-prob 0, no gradient), int16 cannot hold a 151k vocabulary."""
    if ids.dtype in TOKEN_ID_DTYPES:
        return
    integer = not (ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex())
    raise ValueError(f"{name}: expected token ids of dtype torch.int64 or torch.int32, got "
                     f"dtype {ids.dtype}" + ("; it wraps ids and ignore_index (convert with "
                                             ".long())" if integer else ""))


def check_mask(mask, shape: Sequence[int], device: torch.device,
               deferred: Optional[List["Check"]] = None) -> torch.Tensor:
    """Validate an action mask and return it as bool (bool, integer or float 0/1 accepted).
    With ``deferred`` (a list), the value check is appended to it instead of read now."""
    check_tensor("mask", mask, shape=shape, floating=False, device=device)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"mask: expected bool or 0/1 values, got {_describe(mask)}")
    if _data_checks:
        bad = (mask != 0) & (mask != 1)

        def report():
            idx = tuple(torch.nonzero(bad)[0].tolist())
            raise ValueError(f"mask: expected only 0/1 values, got {mask[idx].item()} "
                             f"at index {idx}")
        if deferred is not None:
            deferred.append((bad.any(), report))
        elif bool(bad.any()):
            report()
    return mask != 0


def check_scalar(name: str, value, *, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    value = float(value)
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return value


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def check_triton_backend(device: torch.device) -> None:
    """Raise unless the Triton backend can run on ``device``: triton installed, and CUDA tensors
    or (tests, CPU) the interpreter, ``TRITON_INTERPRET=1``."""
    if not triton_available():
        raise ValueError("backend: 'triton' requested but triton is not installed")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                         "interpreter), got tensors on cpu")


# A data check: a 0-dim bool tensor that is True when the check failed, and the function that
# raises the error for it (it may read the tensors again: that only happens on failure).
Check = Tuple[torch.Tensor, Callable[[], None]]


class PendingChecks:
    """The data checks of one call, not read yet: their flags, computed on the device with no
    host read and copied (asynchronously, into pinned memory, on CUDA) to the host, and the
    functions that raise their errors."""

    def __init__(self, checks: Sequence[Check]):
        flags = torch.stack([flag for flag, _ in checks])
        self.event = None
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            flags = host
        self.flags: Optional[torch.Tensor] = flags
        self.reports = [report for _, report in checks]

    def ready(self) -> bool:
        """Whether the flags can be read without waiting for the device."""
        return self.event is None or self.event.query()

    def check(self) -> None:
        """Read the flags (waiting for the device if they are not there yet) and raise the
        first failure's error; once read, nothing is kept (a second call does nothing)."""
        if self.flags is None:
            return
        if self.event is not None:
            self.event.synchronize()
        flags, reports = self.flags, self.reports
        self.flags, self.reports = None, []
        _pending.pop(id(self), None)
        for report, bad in zip(reports, flags.tolist()):
            if bad:
                report()


# The deferred checks of past calls not read yet: each call first reads those whose flags
# have reached the host (no wait), so a bad batch raises at the latest a call or two later.
_pending: Dict[int, PendingChecks] = {}


def check_pending(wait: bool = True) -> None:
    """Read the deferred data checks of past calls and raise the first error (a call on CUDA
    does not read its own flags; see the module doc). ``wait=False``: only those already on
    the host (what every call does first)."""
    for pending in list(_pending.values()):
        if wait or pending.ready():
            pending.check()


class DeferredChecks:
    """A call's data checks where a kernel looks for bad inputs in its own pass (CUDA): the
    launcher hands :meth:`defer` the kernel's flag (a device tensor, never read by it); when
    the flag is read and set, ``run`` runs the exact checks, which raise the error (or find
    the flag a false alarm). Called directly, it runs them now."""

    def __init__(self, run: Callable[[], None]):
        self.run = run
        self.pending: Optional[PendingChecks] = None

    def __call__(self) -> None:
        self.run()

    def defer(self, flag: torch.Tensor) -> None:
        self.pending = run_checks([(flag, self.run)], defer=True)


def run_checks(checks: Sequence[Check], defer: bool = False) -> Optional[PendingChecks]:
    """Raise the error of the first failed check: now, with one host synchronisation for all
    of them, or (``defer``) when the returned :class:`PendingChecks` is read."""
    if not checks:
        return None
    if defer:
        pending = PendingChecks(checks)
        _pending[id(pending)] = pending
        return pending
    failed = torch.stack([flag for flag, _ in checks]).tolist()
    for (_, report), bad in zip(checks, failed):
        if bad:
            report()
    return None


def logprob_tolerance(dtype: torch.dtype) -> float:
    """How far above 0 a log-prob stored in ``dtype`` may be before it is an error.

    ``log softmax`` is <= 0; a positive value comes from rounding ``z_t - logsumexp(z)``, whose
    error is a few ulps of the logsumexp: below 1e-3 in fp32 for logsumexps up to ~8000, and up
    to ``16 eps`` where the log-probs were computed in the (half) dtype they are stored in.
    What goes beyond that is a bug upstream (logits or negative log-likelihoods passed as
    log-probs), not rounding.
    """
    return max(1e-3, 16 * torch.finfo(dtype).eps)


# The smallest tolerance of logprob_tolerance over the dtypes: the kernels flag any log-prob
# above it, a superset of what the exact check refuses for every dtype.
MIN_LOGPROB_TOLERANCE = min(logprob_tolerance(dt) for dt in
                            (torch.float32, torch.float64, torch.float16, torch.bfloat16))


def value_checks(tensors: Dict[str, Optional[torch.Tensor]], mask: torch.Tensor,
                 rewards: Optional[torch.Tensor] = None, whole: Sequence[str] = (),
                 log_probs: Sequence[str] = ()) -> List[Check]:
    """Finite values on action positions (everywhere for names in ``whole``), log-probs (names
    in ``log_probs``) at most :func:`logprob_tolerance` above 0 on action positions, and no
    reward off the mask. Empty when the data checks are off."""
    if not _data_checks:
        return []
    checks: List[Check] = []

    def on_actions(name: str, x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        return bad if name in whole or x.shape != mask.shape else bad & mask

    def first(bad: torch.Tensor):
        return tuple(torch.nonzero(bad)[0].tolist())

    for name, x in tensors.items():
        if x is None:
            continue
        where = "" if name in whole or x.shape != mask.shape else " on an action position"
        bad = on_actions(name, x, ~torch.isfinite(x))

        def finite(name=name, x=x, bad=bad, where=where):
            idx = first(bad)
            raise ValueError(f"{name}: expected finite values, got {x[idx].item()} at index "
                             f"{idx}{where}")
        checks.append((bad.any(), finite))
        if name not in log_probs:
            continue
        tol = logprob_tolerance(x.dtype)
        positive = on_actions(name, x, x > tol)

        def log_prob(name=name, x=x, bad=positive, where=where, tol=tol):
            idx = first(bad)
            raise ValueError(
                f"{name}: expected log-probs <= 0 (up to {tol:g} of rounding for {x.dtype}), "
                f"got {x[idx].item()} at index {idx}{where}; were logits or negative "
                "log-likelihoods passed instead?")
        checks.append((positive.any(), log_prob))
    if rewards is not None:
        off = (rewards != 0) & ~mask

        def reward_off_mask():
            idx = first(off)
            raise ValueError(
                f"rewards: expected 0 on positions where mask is 0 (they are not actions), got "
                f"{rewards[idx].item()} at index {idx}; put rewards on action tokens")
        checks.append((off.any(), reward_off_mask))
    return checks


@functools.lru_cache(maxsize=None)
def log_weight_limit(dtype: torch.dtype) -> float:
    """The largest log-weight whose ``exp`` fits in ``dtype``: ``log(finfo.max)``."""
    return math.log(torch.finfo(dtype).max)
