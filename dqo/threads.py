"""The CPU thread count of a run, fitted to the cores that other processes leave free.

torch's parallel regions split their work evenly over their threads and wait for the slowest
one. Beside one busy process on a 2-core machine, 2 threads ran the embedded default 3.5x
slower than on a quiet machine (287 s against 82 s), where 1 thread ran it 2.1x slower (172 s;
``benchmarks/NOTES.md``): the thread that shares its core with the other process holds up
every region. So a CPU run measures how much CPU the other processes take (``/proc/stat``'s
busy time less this process's own) and uses the cores they leave, checked again every
``INTERVAL_S`` at the step boundaries of the loops (:func:`adapt`). The native kernels follow,
since they split their rows over ``torch.get_num_threads()``.

An explicit count (``--threads N``) is kept as it is, and so is a run on a GPU machine. Where
``/proc/stat`` does not exist (not Linux) nothing changes.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional, Tuple

import torch

log = logging.getLogger(__name__)

INTERVAL_S = 5.0  # how often adapt() looks again
_PROBE_S = 0.3  # the first look, before the run's work starts


def _machine_busy_s() -> Optional[float]:
    """CPU-seconds every core of the machine has spent busy since boot; None if unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system


class ThreadFitter:
    """Sets ``torch.set_num_threads`` to the cores left free by other processes, between
    1 and ``max_threads``."""

    def __init__(self, max_threads: int, cores: int):
        self.max_threads, self.cores = max_threads, cores
        self.last: Optional[Tuple[float, float, float]] = None

    def _sample(self) -> Optional[Tuple[float, float, float]]:
        busy = _machine_busy_s()
        return None if busy is None else (time.monotonic(), busy, _own_s())

    def start(self) -> None:
        self.last = self._sample()
        if self.last is not None:
            time.sleep(_PROBE_S)
            self.adapt(force=True)

    def adapt(self, force: bool = False) -> None:
        if self.last is None or (not force and time.monotonic() - self.last[0] < INTERVAL_S):
            return
        now = self._sample()
        if now is None:
            return
        wall = now[0] - self.last[0]
        others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / max(wall, 1e-3)
        self.last = now
        n = max(1, min(self.max_threads, int(self.cores - others + 0.5)))
        if n != torch.get_num_threads():
            log.info("threads: %d (other processes use %.1f of %d cores)", n, others,
                     self.cores)
            torch.set_num_threads(n)


_fitter: Optional[ThreadFitter] = None


def fit_threads(threads: int) -> None:
    """``threads`` > 0: use that many; 0: fit the count to the free cores from now on (CPU
    machines only)."""
    global _fitter
    if threads > 0:
        torch.set_num_threads(threads)
        _fitter = None
        return
    if torch.cuda.is_available():
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return
    _fitter = ThreadFitter(torch.get_num_threads(), cores)
    _fitter.start()


def adapt() -> None:
    """At a loop's step boundary: look again at the free cores, at most every INTERVAL_S."""
    if _fitter is not None:
        _fitter.adapt()
