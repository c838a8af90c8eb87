"""Examples -> padded ``[B, T]`` batches: :class:`Batch` for the trainer's loop, and the
``transformers.Trainer`` view of the same examples (:func:`trainer_rows`, batched by
:func:`collate_trainer_rows`, which ``dqo.hf.DQOCollator`` calls)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .schema import Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    action_mask: torch.Tensor  # [B, T] bool, response tokens
    rewards: torch.Tensor  # [B, T]
    behavior_logp: Optional[torch.Tensor]  # [B, T] or None
    ref_logp: Optional[torch.Tensor]  # [B, T] or None
    unfinished: Optional[torch.Tensor] = None  # [B] bool: the return bootstraps from V
    correct: Optional[torch.Tensor] = None  # [B] bool: the outcome label (Example.correct)

    def to(self, device) -> "Batch":
        mv = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return Batch(*(mv(getattr(self, k)) for k in self.__dataclass_fields__))

    def select(self, rows) -> "Batch":
        """The batch of some of its rows (an index or a slice)."""
        return Batch(*(None if x is None else x[rows]
                       for x in (getattr(self, k) for k in self.__dataclass_fields__)))


def collate(examples: Sequence[Example], pad_id: int, *, padding: str = "right") -> Batch:
    """Pad to the longest example. Per-token fields live on the response positions; everything
    else is 0. With ``padding="left"`` the responses end flush right."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding: expected 'left' or 'right', got {padding!r}")
    B, T = len(examples), max(len(e) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    act = torch.zeros(B, T, dtype=torch.bool)
    rew = torch.zeros(B, T)
    has_beh = [e.behavior_logp is not None for e in examples]
    has_ref = [e.ref_logp is not None for e in examples]
    beh = torch.zeros(B, T) if any(has_beh) else None
    ref = torch.zeros(B, T) if all(has_ref) else None
    for b, e in enumerate(examples):
        n, p = len(e), len(e.prompt_ids)
        start = 0 if padding == "right" else T - n
        ids[b, start:start + n] = torch.tensor(e.prompt_ids + e.response_ids)
        attn[b, start:start + n] = 1
        r = slice(start + p, start + n)
        act[b, r] = True
        rew[b, r] = torch.tensor(e.rewards)
        if e.behavior_logp is not None:
            beh[b, r] = torch.tensor(e.behavior_logp)
        if ref is not None:
            ref[b, r] = torch.tensor(e.ref_logp)
    if beh is not None and not all(has_beh):
        if ref is None:
            raise ValueError("collate: some examples have behavior_logp and some do not; "
                             "attach ref_logp first so the missing ones can default to it")
        missing = torch.tensor([not h for h in has_beh])[:, None] & act
        beh = torch.where(missing, ref, beh)
    unfinished = torch.tensor([not e.finished for e in examples], dtype=torch.bool)
    correct = torch.tensor([e.correct for e in examples], dtype=torch.bool)
    return Batch(ids, attn, act, rew, beh, ref, unfinished, correct)


# ---- the transformers.Trainer view ---------------------------------------------------------
# A row is one response: ``input_ids`` (prompt + response token ids), ``prompt_length``,
# ``rewards`` (one per response token: the outcome on the last, process rewards on step ends) or
# ``reward`` (the outcome alone), ``ref_logp`` (one per response token), and optionally
# ``behavior_logp`` (one per response token) and ``finished`` (False: cut at a length limit; its
# return bootstraps from the value of the state after its last token).


def trainer_row(example: Example, ref_logp: Optional[Sequence[float]] = None, *,
                with_ref: bool = True) -> Dict:
    """``example`` as a ``transformers.Trainer`` row (what ``dqo.hf.DQOCollator`` batches), with
    ``ref_logp`` (default: the example's; ``with_ref=False``: none, the trainer computes them
    batch by batch)."""
    ref = example.ref_logp if ref_logp is None else ref_logp
    n = len(example.response_ids)
    if with_ref and (ref is None or len(ref) != n):
        raise ValueError(f"{example.source or 'example'}: needs the reference log-prob of each "
                         f"of its {n} response tokens (dqo.reference_logps.ref_logps), got "
                         f"{'none' if ref is None else len(ref)}")
    row = dict(input_ids=list(example.prompt_ids) + list(example.response_ids),
               prompt_length=len(example.prompt_ids), rewards=list(example.rewards),
               finished=bool(example.finished))
    if with_ref:
        row["ref_logp"] = [float(x) for x in ref]
    if example.behavior_logp is not None:
        row["behavior_logp"] = list(example.behavior_logp)
    return row


def trainer_rows(examples: Sequence[Example],
                 ref_logps: Optional[Sequence[Sequence[float]]] = None) -> List[Dict]:
    """The ``train_dataset`` of a ``dqo.hf.DQOTrainer`` from examples (the rows ``dqo.sample``
    writes, read and tokenized: :func:`dqo.data.read_jsonl`, :func:`dqo.data.tokenize_rows`)
    and their reference log-probs (``dqo.reference_logps.ref_logps``; default: the examples'
    ``ref_logp``). Batched by ``DQOCollator``, they give the tensors :func:`collate` gives the
    trainer's own loop: an example without behaviour log-probs, among some with, takes its
    reference log-probs as them, as :func:`collate` does."""
    if ref_logps is not None and len(ref_logps) != len(examples):
        raise ValueError(f"ref_logps: {len(ref_logps)} lists for {len(examples)} examples")
    rows = [trainer_row(e, None if ref_logps is None else ref_logps[i])
            for i, e in enumerate(examples)]
    if any("behavior_logp" in r for r in rows):
        for r in rows:
            r.setdefault("behavior_logp", list(r["ref_logp"]))
    return rows


def collate_trainer_rows(rows: Sequence[Dict], pad_token_id: int,
                         padding: str = "right") -> Dict[str, torch.Tensor]:
    """Trainer rows (above) -> one padded batch, every DQO column kept: the
    per-response-token lists land on their action positions of the ``[B, T]`` tensors; the
    ``labels`` are the action tokens (the Trainer counts ``num_items_in_batch`` from them)."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding: expected 'left' or 'right', got {padding!r}")
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    act = torch.zeros(B, T, dtype=torch.bool)
    per_token = {k: torch.zeros(B, T) for k in ("rewards", "ref_logp", "behavior_logp")}
    for b, r in enumerate(rows):
        n, p = len(r["input_ids"]), int(r["prompt_length"])
        if not 0 < p < n:
            raise ValueError(f"row {b}: prompt_length must be in [1, {n - 1}] (the tokens "
                             f"before the response), got {p}")
        start = 0 if padding == "right" else T - n
        ids[b, start:start + n] = torch.as_tensor(r["input_ids"])
        attn[b, start:start + n] = 1
        resp = slice(start + p, start + n)
        act[b, resp] = True
        rewards = r.get("rewards")
        if rewards is None:
            rewards = [0.0] * (n - p - 1) + [float(r["reward"])]
        for key, values in (("rewards", rewards), ("ref_logp", r.get("ref_logp")),
                            ("behavior_logp", r.get("behavior_logp"))):
            if values is None:
                continue
            if len(values) != n - p:
                raise ValueError(f"row {b}: '{key}' has {len(values)} entries, the response "
                                 f"{n - p} tokens")
            per_token[key][b, resp] = torch.as_tensor(values, dtype=torch.float32)
    batch = dict(input_ids=ids, attention_mask=attn, action_mask=act,
                 labels=ids.masked_fill(~act, -100),  # the Trainer counts num_items_in_batch
                 rewards=per_token["rewards"],
                 finished=torch.tensor([bool(r.get("finished", True)) for r in rows]))
    if all(r.get("ref_logp") is not None for r in rows):  # else the trainer computes them
        batch["ref_logp"] = per_token["ref_logp"]
    if all(r.get("behavior_logp") is not None for r in rows):
        batch["behavior_logp"] = per_token["behavior_logp"]
    return batch
