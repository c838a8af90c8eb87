"""Reference log-probs, computed once over the dataset with the fused log-prob op and cached.

The cache file is keyed by a fingerprint of the reference model's weights and of the data, so
a changed model or dataset is recomputed and never silently reused. Under data parallelism
every rank computes a 1/world_size share of the examples and the shares are all-gathered, so
the pass takes 1/world_size of the time; rank 0 writes the cache.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .atomic import atomic_write, safe_load
from .data import Example, collate
from .engine import barrier, rank, world_size
from .errors import CheckpointError
from .manifest import digest_line, verify
from .modeling import policy_logprobs
from .threads import adapt as adapt_threads

log = logging.getLogger(__name__)


def fingerprint(model, examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(str(float(p.detach().float().sum())).encode())
    for e in examples:
        h.update(repr((e.prompt_ids, e.response_ids)).encode())
    return h.hexdigest()[:16]


def _write_cache(path: Path, out: List[torch.Tensor]) -> None:
    """The cache file and its digest (``<file>.sha256``, sha256sum's format), the digest first:
    a kill between the two leaves a digest that the old file (or none) fails, so the cache
    is recomputed, never read unchecked."""
    buf = io.BytesIO()
    torch.save(out, buf)
    data = buf.getvalue()
    atomic_write(_digest_path(path), lambda f: f.write(digest_line(data, path.name)))
    atomic_write(path, lambda f: f.write(data), binary=True)


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_cache(path: Path, examples: Sequence[Example]) -> Optional[List[List[float]]]:
    """The cached log-probs, or None (with a warning saying why) if the file is damaged: its
    digest differs, it does not load, or it does not hold one row per example of the right
    length. A cache is only ever recomputed, never trusted when in doubt."""
    try:
        verify(path.parent, "reference log-prob cache", name=_digest_path(path).name)
        cached = safe_load(path)
        if not (isinstance(cached, list) and len(cached) == len(examples) and all(
                isinstance(lp, torch.Tensor) and lp.dim() == 1 for lp in cached)):
            raise CheckpointError(f"{path}: not one row of log-probs per example")
        rows = [lp.tolist() for lp in cached]
        for i, (row, e) in enumerate(zip(rows, examples)):
            if len(row) != len(e.response_ids):
                raise CheckpointError(f"{path}: row {i} holds {len(row)} log-probs for "
                                      f"{len(e.response_ids)} response tokens")
    except CheckpointError as exc:
        log.warning("reference log-probs: the cache is damaged, recomputing it (%s)", exc)
        return None
    return rows


@torch.no_grad()
def ref_logps(model, examples: Sequence[Example], pad_id: int, *, batch_size: int = 32,
              cache_dir: Optional[str] = None, progress: bool = False) -> List[List[float]]:
    """The log-prob of every response token of every example under ``model`` (the reference
    policy), from the cache if valid; the examples are left as they are. ``progress``: a
    progress bar on rank 0."""
    key = fingerprint(model, examples)
    path = Path(cache_dir) / f"ref_logps-{key}.pt" if cache_dir else None
    cached = _read_cache(path, examples) if path is not None and path.is_file() else None
    if cached is not None:
        log.info("reference log-probs loaded from %s", path)
        return cached
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    r, w = rank(), world_size()
    mine = list(range(r, len(examples), w))
    log.info("reference log-probs: %d of %d examples on rank %d", len(mine), len(examples), r)
    rows = []  # (example index, log-probs of its response tokens)
    starts = range(0, len(mine), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="reference log-probs", leave=False, disable=r != 0 or None)
    for start in starts:
        adapt_threads()
        idx = mine[start:start + batch_size]
        # the tokens alone: behaviour log-probs on some examples and not others are no concern
        b = collate([replace(examples[i], behavior_logp=None) for i in idx], pad_id).to(device)
        lp = policy_logprobs(model, b.input_ids, b.attention_mask, b.action_mask).float().cpu()
        mask = b.action_mask.cpu()
        rows.extend((i, lp[k][mask[k]]) for k, i in enumerate(idx))
    model.train(was_training)
    if w > 1:
        shares = [None] * w
        torch.distributed.all_gather_object(shares, rows)
        rows = [row for share in shares for row in share]
    out = [None] * len(examples)
    for i, lp in rows:
        out[i] = lp
    if path is not None and r == 0:
        _write_cache(path, out)
    barrier()  # no rank reads the cache before it is complete
    return [lp.tolist() for lp in out]


def compute_ref_logps(model, examples: List[Example], pad_id: int, *, batch_size: int = 32,
                      cache_dir: Optional[str] = None, progress: bool = False) -> None:
    """Fill ``example.ref_logp`` (per response token) for every example: :func:`ref_logps`,
    attached where the trainer's loop and the algorithms' ``setup`` read them."""
    for e, lp in zip(examples, ref_logps(model, examples, pad_id, batch_size=batch_size,
                                         cache_dir=cache_dir, progress=progress)):
        e.ref_logp = lp
