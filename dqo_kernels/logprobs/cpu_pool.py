"""Large CPU buffers for the native log-prob ops: a pool of anonymous mappings advised onto
transparent huge pages, and :func:`empty_cache`, which gives the unused ones back."""
from __future__ import annotations

import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

import torch

HUGE_PAGE = 2 << 20
POOL_REGIONS = 4  # buffers kept for reuse: a backward's gradient, plus one or two in .grad
# a free buffer not handed out in this many requests is given back: a size that batches of
# varying length asked for once is not kept for ever
POOL_IDLE_TAKES = 16
CGROUP_ROOT = "/sys/fs/cgroup"  # where the container's memory limit is read (tests move it)
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge number (2^63 less a page)


def _cgroup_files(root: Path) -> List[Path]:
    """The memory-limit files that may apply: cgroup v2's ``memory.max`` and v1's
    ``memory.limit_in_bytes`` at the root (a container's own cgroup, in its namespace) and at
    this process's cgroup path (``/proc/self/cgroup``) below it."""
    files = [root / "memory.max", root / "memory" / "memory.limit_in_bytes",
             root / "memory.limit_in_bytes"]
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[2] in ("", "/"):
            continue
        rel = parts[2].lstrip("/")
        if parts[0] == "0":
            files.append(root / rel / "memory.max")
        elif "memory" in parts[1].split(","):
            files.append(root / "memory" / rel / "memory.limit_in_bytes")
    return files


def memory_limit(root=None) -> Optional[int]:
    """The container's memory limit in bytes (the smallest cgroup v1/v2 limit found under
    ``root``, default :data:`CGROUP_ROOT`), or None where there is none."""
    limits = []
    for path in _cgroup_files(Path(root or CGROUP_ROOT)):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _NO_LIMIT:  # "max": no limit
            limits.append(int(text))
    return min(limits) if limits else None


def _default_pool_bytes(root=None) -> int:
    """A quarter of the memory this process may use (the machine's, or its container's
    cgroup limit if lower: a pool sized from the host's RAM got a job OOM-killed in a 1.4 GB
    container), at most 16 GiB: room for the gradient of a 151k vocabulary at 8k tokens (5 GB
    in fp32), which a fresh mapping made 3x slower (the page faults and huge-page compaction
    of 5 GB every step; benchmarks/NOTES.md)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        total = 8 << 30
    limit = memory_limit(root)
    if limit is not None:
        total = min(total, limit)
    return min(total // 4, 16 << 30)


# the most memory the pool keeps mapped, in use or not (a caching allocator's cost)
POOL_BYTES = int(os.environ.get("DQO_KERNELS_POOL_BYTES", _default_pool_bytes()))


def _new_region(size: int) -> mmap.mmap:
    """An anonymous mapping of ``size`` bytes, advised onto transparent huge pages."""
    region = mmap.mmap(-1, size)
    madvise = getattr(mmap, "MADV_HUGEPAGE", None)
    if madvise is not None and os.environ.get("DQO_KERNELS_HUGEPAGES", "1") != "0":
        region.madvise(madvise)  # advice only: without THP it changes nothing
    return region


class _RegionPool:
    """Large CPU buffers reused once no tensor uses them any more, so that a backward's
    gradient buffer is memory already faulted in: a fresh one costs a page fault and a kernel
    zero-fill per page, more than the softmax gradient itself (benchmarks/NOTES.md).

    A region is an anonymous mapping, and every tensor made from it holds a reference to it
    (``torch.frombuffer``: views, ``.grad`` and all); the pool hands a region out again only
    when it holds the last reference (the smallest free one that is large enough). It keeps at
    most ``POOL_REGIONS`` regions and ``POOL_BYTES`` of them, dropping free ones (least
    recently used first) to make room; a buffer that does not fit is simply not pooled (freed
    with its last tensor). When it maps a new region, the free ones smaller than it (no use
    for this request) go, and a free one not handed out for ``POOL_IDLE_TAKES`` requests goes
    too: batches of varying length, each asking for a slightly larger buffer, once kept every
    size they asked for, twice the job's memory."""

    def __init__(self):
        self.regions: List[mmap.mmap] = []
        self.last_used: Dict[int, int] = {}  # id(region) -> the request that last took it
        self.requests = 0
        self.lock = threading.Lock()

    def retained(self) -> int:
        """The bytes the pool keeps mapped, in use or not."""
        return sum(len(r) for r in self.regions)

    def _drop(self, indices) -> None:
        for i in sorted(indices, reverse=True):
            self.last_used.pop(id(self.regions[i]), None)
            del self.regions[i]

    def _free(self, i: int) -> bool:
        # the pool's list holds one reference, getrefcount's argument the other: no tensor
        return sys.getrefcount(self.regions[i]) <= 2

    def _free_indices(self) -> List[int]:
        return [i for i in range(len(self.regions)) if self._free(i)]

    def take(self, size: int) -> mmap.mmap:
        with self.lock:
            self.requests += 1
            self._drop([i for i in self._free_indices() if self.requests - self.last_used.get(
                id(self.regions[i]), 0) > POOL_IDLE_TAKES])
            # the smallest free region that holds `size`: batches of varying length (padded
            # to their longest row) ask for a slightly different size every step
            best = None
            for i in range(len(self.regions)):  # by index: a loop variable is a reference
                if len(self.regions[i]) >= size and self._free(i) and (
                        best is None or len(self.regions[i]) < len(self.regions[best])):
                    best = i
            if best is not None:
                self.last_used[id(self.regions[best])] = self.requests
                return self.regions[best]
            region = _new_region(size)
            if size > POOL_BYTES:
                return region
            free = sorted(self._free_indices(),  # least recently used first
                          key=lambda i: self.last_used.get(id(self.regions[i]), 0))
            stale = [i for i in free if len(self.regions[i]) < size]
            free = [i for i in free if i not in stale]
            drop = set(stale)
            total = self.retained() - sum(len(self.regions[i]) for i in stale)
            while free and (total + size > POOL_BYTES or
                            len(self.regions) - len(drop) >= POOL_REGIONS):
                i = free.pop(0)
                drop.add(i)
                total -= len(self.regions[i])
            self._drop(drop)
            if total + size <= POOL_BYTES and len(self.regions) < POOL_REGIONS:
                self.regions.append(region)
                self.last_used[id(region)] = self.requests
            return region

    def release(self) -> int:
        """Unmap every free region; returns the bytes released."""
        with self.lock:
            free = self._free_indices()
            released = sum(len(self.regions[i]) for i in free)
            self._drop(free)
            return released


_pool = _RegionPool()


def empty_cache() -> int:
    """Give the CPU buffers that no tensor uses back to the system (what
    ``torch.cuda.empty_cache`` does for CUDA memory); returns the bytes released."""
    return _pool.release()


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a large scratch or gradient buffer (4 MiB and up), from
    a pool of buffers that no tensor uses any more (:class:`_RegionPool`), advised onto
    transparent huge pages. ``DQO_KERNELS_POOL=0`` turns the pool off (a fresh mapping each
    time), ``DQO_KERNELS_HUGEPAGES=0`` the huge-page advice; ``DQO_KERNELS_POOL_BYTES`` caps
    what the pool keeps mapped (default: a quarter of the machine's memory or of the
    container's cgroup limit, whichever is lower, at most 16 GiB)."""
    shape = tuple(int(n) for n in shape)
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < 2 * HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    # one huge page longer than needed, used from its first 2 MiB boundary
    size = nbytes + HUGE_PAGE
    if os.environ.get("DQO_KERNELS_POOL", "1") == "0":
        region = _new_region(size)
    else:
        region = _pool.take(size)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)
