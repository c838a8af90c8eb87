"""Large CPU buffers for the native log-prob ops: a pool of anonymous mappings advised onto
transparent huge pages, and :func:`empty_cache`, which gives the unused ones back."""
from __future__ import annotations

import mmap
import os
import sys
import threading
from typing import List

import torch

HUGE_PAGE = 2 << 20
POOL_REGIONS = 4  # buffers kept for reuse: a backward's gradient, plus one or two in .grad


def _default_pool_bytes() -> int:
    """A quarter of the machine's memory, at most 16 GiB: room for the gradient of a 151k
    vocabulary at 8k tokens (5 GB in fp32), which a fresh mapping made 3x slower (the page
    faults and huge-page compaction of 5 GB every step; benchmarks/NOTES.md)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 2 << 30
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
    most ``POOL_REGIONS`` regions and ``POOL_BYTES`` of them, dropping free ones (oldest first)
    to make room; a buffer that does not fit is simply not pooled (freed with its last
    tensor)."""

    def __init__(self):
        self.regions: List[mmap.mmap] = []
        self.lock = threading.Lock()

    def _free(self, i: int) -> bool:
        # the pool's list holds one reference, getrefcount's argument the other: no tensor
        return sys.getrefcount(self.regions[i]) <= 2

    def _free_indices(self) -> List[int]:
        return [i for i in range(len(self.regions)) if self._free(i)]

    def take(self, size: int) -> mmap.mmap:
        with self.lock:
            # the smallest free region that holds `size`: batches of varying length (padded
            # to their longest row) ask for a slightly different size every step
            best = None
            for i in range(len(self.regions)):  # by index: a loop variable is a reference
                if len(self.regions[i]) >= size and self._free(i) and (
                        best is None or len(self.regions[i]) < len(self.regions[best])):
                    best = i
            if best is not None:
                return self.regions[best]
            region = _new_region(size)
            if size > POOL_BYTES:
                return region
            free = self._free_indices()
            total, drop = sum(len(r) for r in self.regions), []
            while free and (total + size > POOL_BYTES or
                            len(self.regions) - len(drop) >= POOL_REGIONS):
                i = free.pop(0)
                drop.append(i)
                total -= len(self.regions[i])
            for i in reversed(drop):
                del self.regions[i]
            if total + size <= POOL_BYTES and len(self.regions) < POOL_REGIONS:
                self.regions.append(region)
            return region

    def release(self) -> int:
        """Unmap every free region; returns the bytes released."""
        with self.lock:
            free = self._free_indices()
            released = sum(len(self.regions[i]) for i in free)
            for i in reversed(free):
                del self.regions[i]
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
    what the pool keeps mapped (default: a quarter of the machine's memory, at most 16 GiB)."""
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
