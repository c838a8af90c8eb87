"""Sampling a whole offline dataset to a file, batch by batch, so that a kill costs at most the
batch in flight and ``--resume`` ends with the bytes an uninterrupted run writes.

- Rows are appended durably (:class:`dqo.data.partial.PartialRows`: write, flush, fsync) after
  every generation batch, for the prompts whose ``n`` samples that batch completed, in prompt
  order; the finished file is renamed to ``out`` in one step, so ``out`` is whole or absent.
- The decoding record (``data.decoding.json``) is written before the first row.
- Prompt ``i``'s ``k``-th sample draws from its own generator, seeded from (``seed``, ``i``,
  ``k``) (:func:`dqo.generation.hf.sample_seed`; vLLM: a per-request seed), never from a
  generator the batch shares, so what is drawn for a prompt does not depend on where a run was
  cut. A resumed run redoes the generation batch in which the first missing prompt began, so
  that every batch has the composition it had in the uninterrupted run: with the same options
  (model, prompts, ``n``, batch size, decoding, seed, reward), on the same machine (device,
  or CPU thread count: reductions split over other threads round differently), the file is
  byte for byte the same. Another batch size draws the same random numbers, but a sample can
  still change where padding moves a logit by a rounding error across a draw's boundary, and
  the recorded log-probs in their last bits: bit-exactness is guaranteed for the same options
  only.
- Monte-Carlo process rewards (``process_n``) are computed per batch of completed prompts,
  seeded from (``seed``, first prompt of the batch).
- Under a launcher (:mod:`dqo.launcher`) the ranks run the generation batches in turns (rank
  r: batches r, r + W, ...; each exactly as one process runs it) and gather them to rank 0
  after every round of W, which labels and writes them as one process does: the same file, and
  the same ``--resume``. Rank 0 alone grades and computes process rewards.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..data.partial import PartialRows, finished, partial_dir
from ..decoding import DecodingConfig, encode_prompt, sidecar
from ..engine import barrier, rank, world_size
from ..errors import DataError, RewardError
from ..launcher import in_order, shard
from ..rewards import Reward
from ..rng import stage_rng, stage_seed
from .hf import sample_batches
from .labels import label_samples
from .process_rewards import mc_process_scores
from .types import Sample

log = logging.getLogger(__name__)


@dataclass
class SampleJob:
    """What decides the rows: ``n`` samples of every prompt, graded by the reward."""

    out: str
    n: int = 20
    batch_size: int = 32
    seed: int = 0
    grade_truncated: bool = False
    process_scores: str = "none"  # "mc": Monte-Carlo process rewards on failed responses
    process_n: int = 20
    process_reward_total: float = 0.5
    source: str = "prompts"  # the prompts file, for errors that name a row


def prompt_seed(seed: int, i: int) -> int:
    """The seed of prompt ``i``'s samples in a run with ``seed``."""
    return stage_seed(seed, f"prompt {i}")


def batch_ends(n_prompts: int, n: int, batch_size: int, hf: bool) -> List[int]:
    """How many prompts are complete after each generation batch: a Hugging Face model samples
    ``batch_size`` jobs (prompt, sample) a batch, a Sampler ``batch_size // n`` whole prompts
    (at least one)."""
    if hf:
        jobs = n_prompts * n
        return [min(jobs, s + batch_size) // n for s in range(0, jobs, batch_size)]
    per = max(1, batch_size // n)
    return [min(n_prompts, s + per) for s in range(0, n_prompts, per)]


def _batches(model, tok, prompts: Sequence[str], decoding: DecodingConfig, job: SampleJob,
             first_prompt: int, progress: bool) -> Iterator[List[Tuple[int, Sample]]]:
    """The generation batches from the one holding ``first_prompt`` on, in one-process order;
    under a launcher each rank runs its share (:mod:`dqo.launcher`) and every rank gets all."""
    seeds = [prompt_seed(job.seed, i) for i in range(len(prompts))]
    if isinstance(model, torch.nn.Module):
        yield from in_order(sample_batches(
            model, tok, prompts, decoding=decoding, n=job.n, batch_size=job.batch_size,
            seeds=seeds, first_batch=first_prompt * job.n // job.batch_size, sharded=True,
            progress=progress and rank() == 0))
        return
    per = max(1, job.batch_size // job.n)

    def mine():
        for s in shard(range(first_prompt // per * per, len(prompts), per)):
            out = model.generate(tok, prompts[s:s + per], decoding=decoding, n=job.n,
                                 seeds=seeds[s:s + per])
            yield [(s + j, smp) for j, ss in enumerate(out) for smp in ss]
    yield from in_order(mine())


def fingerprint(prompt_rows: Sequence[Dict]) -> str:
    """A digest of the prompt rows as read (any file format)."""
    text = json.dumps(list(prompt_rows), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_prompts(tok, prompts: Sequence[str], source: str) -> None:
    """Every prompt encodes to at least one token (``generate`` fails on an empty one, naming
    no row): a DataError naming the row, before any sampling."""
    for i, p in enumerate(prompts):
        if not encode_prompt(tok, p):
            raise DataError(f"{source}: prompt {i + 1}: encodes to no tokens ({p[:60]!r})")


def sample_dataset(model, tok, prompt_rows: Sequence[Dict], prompts: Sequence[str],
                   reward: Reward, decoding: DecodingConfig, job: SampleJob, *,
                   resume: bool = False, progress: bool = False,
                   state: Optional[Dict] = None) -> bool:
    """Sample ``job.n`` responses to every prompt (``prompts``: the rows' prompts as the model
    sees them, template applied), grade them, write them to ``job.out`` (see the module
    docstring). ``state``: anything else that decides the rows (the model, the reward), checked
    on resume. Returns False when there was nothing to do (``resume`` and ``job.out`` is
    complete)."""
    from ..data.schema import extra_columns

    if resume and finished(job.out):
        log.info("--resume: %s is complete (no %s), nothing to do", job.out,
                 partial_dir(job.out))
        return False
    decoding = decoding.with_stop_ids(tok, model)
    check_prompts(tok, prompts, job.source)
    kept = {k: v for k, v in asdict(job).items() if k not in ("source", "out")}
    state = dict(state or {}, job=kept, decoding=asdict(decoding), prompts=fingerprint(prompt_rows))
    ends = batch_ends(len(prompts), job.n, job.batch_size, isinstance(model, torch.nn.Module))
    if rank() != 0:  # rank 0 writes; the others sample their share of the batches
        start = _shared(None)
        if start is None:
            raise RuntimeError("rank 0 stopped before sampling (its error says why)")
        for _ in _batches(model, tok, prompts, decoding, job, start, False):
            pass
        barrier()  # job.out is complete when every rank returns
        return True
    try:
        part = PartialRows.open(job.out, state, resume=resume)
    except BaseException:
        _shared(None)  # the other ranks stop too
        raise
    started = False
    try:
        done = part.n_rows // job.n
        start = max([0] + [e for e in ends if e <= done])  # a batch boundary: its units whole
        if part.n_rows:
            log.info("--resume: %d rows of %d prompts kept in %s; sampling from prompt %d",
                     start * job.n, start, partial_dir(job.out), start + 1)
        part.keep(start * job.n)
        decoding.save(sidecar(job.out))  # before the rows it describes
        started = True
        _shared(start)
        pending: Dict[int, List[Sample]] = {}
        for batch in _batches(model, tok, prompts, decoding, job, start, progress):
            for i, s in batch:
                pending.setdefault(i, []).append(s)
            complete = sorted(i for i, ss in pending.items() if len(ss) == job.n)
            samples = {i: pending.pop(i) for i in complete}
            rows = []
            for i in (i for i in complete if i >= start):
                r = prompt_rows[i]
                try:
                    rows += label_samples([prompts[i]], [r.get("answer")], [samples[i]], reward,
                                          grade_truncated=job.grade_truncated,
                                          solutions=[r.get("solution")],
                                          columns=[extra_columns(r)])
                except RewardError as exc:
                    raise RewardError(f"{job.source}: prompt {i + 1}: {exc}") from exc
            if rows and job.process_scores == "mc":
                first = min(i for i in complete if i >= start)
                with stage_rng(job.seed, f"process rewards from prompt {first}"):
                    rows = mc_process_scores(model, tok, rows, reward, n=job.process_n,
                                             total=job.process_reward_total, decoding=decoding,
                                             batch_size=job.batch_size)
            part.append(rows)
        if part.n_rows != len(prompts) * job.n:  # a bug, not a user's mistake
            raise RuntimeError(f"sampled {part.n_rows} rows, expected {len(prompts) * job.n}")
    except BaseException as exc:
        if not started:
            _shared(None)
        part.close()
        log.error("sampling stopped (%s): the rows of the first %d prompts are kept in %s; "
                  "rerun with --resume to continue", type(exc).__name__,
                  part.n_rows // job.n, partial_dir(job.out))
        raise
    part.finish()
    barrier()
    return True


def _shared(start: Optional[int]) -> Optional[int]:
    """Rank 0's ``start`` (None: it stopped) on every rank; in one process, ``start``."""
    if world_size() == 1:
        return start
    box = [start]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
