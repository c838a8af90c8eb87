"""Work shared among the processes of a multi-process launcher (``torchrun``, ``deepspeed``)
outside training: :func:`launcher_group` joins the launcher's process group for the duration
of a command, :func:`in_order` puts every rank's share of an ordered sequence of work items
back in the order one process would have produced them.

A work item ``j`` of a sequence belongs to rank ``j % world_size`` (rank ``r`` takes items
``r, r + W, r + 2W, ...``), so that each item (a generation batch) is exactly the one a single
process would run, and gives the same bits on the same machine.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, TypeVar

import torch

from .engine import leave_process_group, rank, world_size

T = TypeVar("T")


def launcher_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_ranks(engine: str) -> None:
    """``--engine vllm`` runs in one process (vLLM spreads a model over GPUs itself): under a
    launcher of several, a UsageError."""
    if engine == "vllm" and launcher_world_size() > 1:
        from .errors import UsageError
        raise UsageError(f"--engine vllm: runs in one process (vLLM uses several GPUs itself), "
                         f"got a launcher of {launcher_world_size()}; use --engine hf under a "
                         f"launcher")


@contextmanager
def launcher_group() -> Iterator[None]:
    """Under a launcher of several processes, join its process group (gloo on CPU; nccl on
    GPU, with ``cuda:LOCAL_RANK`` as this process's device) and leave it on exit; in one
    process, nothing. A group already joined is used as it is and left open."""
    if launcher_world_size() <= 1 or torch.distributed.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        leave_process_group()


def shard(items: range) -> range:
    """This rank's share of ``items``: every ``world_size``-th from its rank on."""
    return items[rank()::world_size()]


def in_order(mine: Iterator[T]) -> Iterator[T]:
    """Every rank's items in the one-process order, on every rank: ``mine`` yields this rank's
    share (:func:`shard`) in order; round ``j`` gathers item ``j`` of every rank (items
    ``jW .. jW + W - 1``), so the ranks meet once per round and the caller can act on (write)
    each round's items before the next. Every rank must drain its iterator."""
    w = world_size()
    if w == 1:
        yield from mine
        return
    end = object()
    while True:
        item = next(mine, end)
        shares = [None] * w
        torch.distributed.all_gather_object(shares, (item is not end, None if item is end
                                                     else item))
        for has, it in shares:
            if has:
                yield it
        if not any(has for has, _ in shares):
            return
