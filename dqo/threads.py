"""The CPU thread count of a run: chosen once, at its start, and kept.

torch's reductions (matmuls, sums) split their work over the threads and add the partial
results in an order that depends on how many there are, so the thread count decides the last
bits of every number a CPU run computes. A run therefore fixes it once, from the cores the
process may use (``os.sched_getaffinity``), never from the machine's load; it is recorded
with every checkpoint (and in ``<out>/run.json``), and ``--resume`` restores it, so that a
resumed run ends bit for bit where an uninterrupted one ends, whatever else the machine runs.

``--adapt-threads`` is the one exception, opt-in: it refits the count to the cores other
processes leave free (``/proc/stat``'s busy time less this process's own), every
``INTERVAL_S`` at the loops' step boundaries (:func:`adapt`). It is kept because beside one
busy process on a 2-core machine 2 threads ran the embedded default 3.5x slower than on a
quiet machine and fitted threads only 1.7x (``benchmarks/NOTES.md``): torch's parallel regions
wait for the thread that shares its core. But then the results depend on the machine's load
(and a ``--resume`` no longer ends where an uninterrupted run ends), which is why it is not
the default. The native kernels split their rows over ``torch.get_num_threads()`` and give
the same bits for any count.
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


def usable_cores() -> Optional[int]:
    """The cores this process may run on (its affinity mask, which container limits and
    ``taskset`` narrow); None where the platform does not say (not Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return None


class ThreadFitter:
    """Sets ``torch.set_num_threads`` to the cores left free by other processes, between
    1 and ``max_threads`` (``--adapt-threads`` only: the results then depend on the load)."""

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
            log.info("threads: %d (other processes use %.1f of %d cores; --adapt-threads)", n,
                     others, self.cores)
            torch.set_num_threads(n)


_fitter: Optional[ThreadFitter] = None


def fit_threads(threads: int, recorded: Optional[int] = None, adaptive: bool = False) -> int:
    """Fix the run's thread count now and return it. ``threads`` > 0: that many; 0: the run's
    ``recorded`` count when it resumes (a warning if this machine lets it use another number
    of cores), else every core the process may use (on a GPU machine: torch's count, as the
    launcher set it). ``adaptive`` (``--adapt-threads``): refit it to the free cores from now
    on (CPU machines only; the results then depend on the machine's load)."""
    global _fitter
    _fitter = None
    cores = usable_cores()
    if threads > 0:
        n = threads
        if recorded and recorded != threads:
            log.warning("--threads %d, but the run used %d threads until its checkpoint: sums "
                        "round differently, the resumed run will not end bit for bit where "
                        "an uninterrupted one would", threads, recorded)
    elif recorded:
        n = recorded
        if cores is not None and cores != recorded:
            log.warning("resumed with the run's %d threads; this process may use %d cores "
                        "(--threads N overrides, at the cost of other rounding)", recorded,
                        cores)
    elif cores is not None and not torch.cuda.is_available():
        n = cores
    else:
        n = torch.get_num_threads()
    torch.set_num_threads(n)
    if adaptive and not torch.cuda.is_available() and cores is not None:
        log.warning("--adapt-threads: the thread count follows the machine's load; results "
                    "are not reproducible bit for bit")
        _fitter = ThreadFitter(n, cores)
        _fitter.start()
    return n


def run_threads() -> int:
    """The count the run fixed at its start (what checkpoints record): torch's, or under
    ``--adapt-threads`` the count it started with."""
    return _fitter.max_threads if _fitter is not None else torch.get_num_threads()


def adapt() -> None:
    """At a loop's step boundary: look again at the free cores, at most every INTERVAL_S
    (``--adapt-threads`` only; otherwise nothing)."""
    if _fitter is not None:
        _fitter.adapt()
