"""The CPU buffer pool of the native log-prob ops respects the container (issue 27 C.4): its
cap follows the cgroup memory limit, and batches of varying length do not leave a buffer of
every size they asked for behind."""
import random

import pytest
import torch

from dqo_kernels.logprobs import cpu_pool

MiB = 1 << 20


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(cpu_pool, "_pool", cpu_pool._RegionPool())
    monkeypatch.setenv("DQO_KERNELS_POOL", "1")
    monkeypatch.setattr(cpu_pool, "POOL_BYTES", 1 << 30)
    return cpu_pool._pool


def physical_bytes():
    import os
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("layout, text, limit", [
    ("v2", "1400000000\n", 1400000000),
    ("v2", "max\n", None),
    ("v1", "2147483648\n", 2147483648),
    ("v1", "9223372036854771712\n", None),  # v1's "no limit"
    (None, "", None),  # no cgroup files at all
])
def test_the_pool_cap_follows_the_cgroup_memory_limit(tmp_path, layout, text, limit):
    if layout == "v2":
        (tmp_path / "memory.max").write_text(text)
    elif layout == "v1":
        (tmp_path / "memory").mkdir()
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text(text)
    assert cpu_pool.memory_limit(tmp_path) == limit
    total = physical_bytes() if limit is None else min(limit, physical_bytes())
    assert cpu_pool._default_pool_bytes(tmp_path) == min(total // 4, 16 << 30)


def step(sizes_mib):
    """One training step's buffers: a gradient per size, alive together, then freed."""
    held = [cpu_pool.empty((n * MiB // 4,), torch.float32) for n in sizes_mib]
    for t in held:
        t.fill_(1.0)  # touched, as a gradient is
    del held


def test_growing_batches_keep_one_buffer_not_every_size(pool):
    """Each step a slightly longer batch (5, 6, ... 12 MiB): the pool kept all four last
    sizes (43 MiB for a 12 MiB job); now the larger one replaces the smaller."""
    for n in range(5, 13):
        step([n])
    assert pool.retained() <= 12 * MiB + 2 * cpu_pool.HUGE_PAGE


def test_varying_batches_retain_bounded_bytes(pool):
    rng = random.Random(0)
    largest = 0
    for _ in range(60):
        sizes = [rng.randint(4, 24), rng.randint(4, 24)]  # a gradient and a chunk buffer
        largest = max(largest, *sizes)
        step(sizes)
        # the two buffers a step holds at once, at most the largest size each: never a
        # buffer of every size seen
        assert pool.retained() <= 2 * (largest * MiB + cpu_pool.HUGE_PAGE)


def test_idle_buffers_are_given_back(pool):
    step([30, 6])  # a long batch once, then short ones: the 6 MiB buffer serves them
    for _ in range(cpu_pool.POOL_IDLE_TAKES + 1):
        step([5])
    assert pool.retained() <= 6 * MiB + cpu_pool.HUGE_PAGE  # the idle 30 MiB one went back
