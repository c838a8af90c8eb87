"""Offline data: jsonl rows -> tokenized examples -> padded ``[B, T]`` batches.

One jsonl row is one sampled response::

    {"prompt": "...", "response": "...", "reward": 1.0,            # required
     "answer": "42",                                               # optional, for evaluation
     "steps": ["step 1", "step 2"], "step_rewards": [0.1, 0.0],    # optional process rewards
     "response_ids": [..], "behavior_logp": [..]}                  # optional, from dqo.sample

``steps`` follow TRL's stepwise convention: the response is the steps joined by ``"\\n"`` (give
either, or both if they agree), and ``step_rewards[i]`` is placed on the last token of step i.
The outcome ``reward`` goes on the last response token (the EOS token that is appended).
``behavior_logp`` holds the sampling policy's log-prob of every response token, EOS included;
it needs ``response_ids`` (the sampled tokens) unless re-tokenizing the response gives exactly
as many tokens. A bad row is reported with its line number and skipped, or raises with
``strict=True``; never silently dropped.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .atomic import atomic_write

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A row that cannot be used; the message names the file, line and field."""


@dataclass
class Example:
    prompt_ids: List[int]
    response_ids: List[int]
    rewards: List[float]  # per response token
    behavior_logp: Optional[List[float]] = None  # per response token
    prompt: str = ""
    response: str = ""
    answer: Optional[str] = None
    source: str = ""  # file:line
    ref_logp: Optional[List[float]] = field(default=None, repr=False)  # per response token

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_row(row, where: str) -> Dict:
    """Validate one decoded row; returns it with ``response`` filled from ``steps``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "reward"):
        if key not in row:
            raise DataError(f"{where}: missing required field {key!r}")
    if not isinstance(row["prompt"], str) or not row["prompt"]:
        raise DataError(f"{where}: 'prompt' must be a non-empty string")
    if not _num(row["reward"]):
        raise DataError(f"{where}: 'reward' must be a finite number, got {row['reward']!r}")
    steps = row.get("steps")
    if steps is not None:
        if not (isinstance(steps, list) and steps and all(isinstance(s, str) for s in steps)):
            raise DataError(f"{where}: 'steps' must be a non-empty list of strings")
        joined = "\n".join(steps)
        if "response" in row and row["response"] != joined:
            raise DataError(f"{where}: 'response' differs from the 'steps' joined by newlines")
        row = dict(row, response=joined)
        sr = row.get("step_rewards")
        if sr is not None and not (isinstance(sr, list) and len(sr) == len(steps)
                                   and all(_num(x) for x in sr)):
            raise DataError(f"{where}: 'step_rewards' must be {len(steps)} finite numbers "
                            f"(one per step)")
    elif row.get("step_rewards") is not None:
        raise DataError(f"{where}: 'step_rewards' given without 'steps'")
    if not isinstance(row.get("response"), str):
        raise DataError(f"{where}: missing 'response' (or 'steps')")
    for key, ok in (("response_ids", lambda v: isinstance(v, int) and v >= 0),
                    ("behavior_logp", lambda v: _num(v) and v <= 0)):
        v = row.get(key)
        if v is not None and not (isinstance(v, list) and v and all(ok(x) for x in v)):
            what = "non-negative token ids" if key == "response_ids" else "finite log-probs <= 0"
            raise DataError(f"{where}: '{key}' must be a non-empty list of {what}")
    if row.get("response_ids") is not None and row.get("behavior_logp") is not None \
            and len(row["response_ids"]) != len(row["behavior_logp"]):
        raise DataError(f"{where}: 'behavior_logp' has {len(row['behavior_logp'])} entries, "
                        f"'response_ids' {len(row['response_ids'])}")
    return dict(row, _source=where)


def _lines(path) -> Iterator[Tuple[str, str]]:
    """``("path:lineno", line)`` for every non-blank line of a jsonl file."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{i}", line


def _parse(where: str, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None


def read_jsonl(path, *, strict: bool = False) -> Tuple[List[Dict], List[str]]:
    """Rows of a jsonl file and the errors of the rows that were skipped."""
    rows, errors = [], []
    for where, line in _lines(path):
        try:
            rows.append(check_row(_parse(where, line), where))
        except DataError as e:
            if strict:
                raise
            errors.append(str(e))
    for e in errors:
        log.warning("skipped bad row: %s", e)
    if errors:
        log.warning("%s: %d of %d rows skipped (pass strict=True / --strict-data to fail "
                    "instead)", path, len(errors), len(errors) + len(rows))
    return rows, errors


def read_prompts(path) -> Tuple[List[str], List[str]]:
    """``prompt`` and ``answer`` of every row of a jsonl file (for sampling and evaluation)."""
    prompts, answers = [], []
    for where, line in _lines(path):
        obj = _parse(where, line)
        if not isinstance(obj, dict) or "prompt" not in obj or "answer" not in obj:
            raise DataError(f"{where}: expected an object with 'prompt' and 'answer'")
        prompts.append(str(obj["prompt"]))
        answers.append(str(obj["answer"]))
    return prompts, answers


def write_jsonl(path, rows: Iterable[Dict]) -> None:
    """Write rows atomically (a partial file is never left under ``path``)."""
    def write(f):
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")

    atomic_write(path, write)


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: wrapped in the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return prompt


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_steps(response: str) -> List[str]:
    """A response's steps, as the data format defines them: its lines, blank ones included
    (``"\\n".join(steps) == response``), so that step i always means the same line."""
    return response.split("\n")


def step_end_tokens(tokenizer, steps: Sequence[str], response_ids: Sequence[int]) -> List[int]:
    """Index (in ``response_ids``) of the token that ends every step: the last token starting
    before the step's last character (an empty step borrows the token before it)."""
    ends, pos = [], 0
    for s in steps:
        pos += len(s)
        ends.append(pos)
        pos += 1  # the newline
    # Character offset at which every token starts. From the ids themselves (what is trained
    # on), decoding token by token: exact for text whose characters do not straddle tokens.
    starts, pos = [], 0
    for t in response_ids:
        starts.append(pos)
        pos += len(tokenizer.decode([t], skip_special_tokens=True))
    return [max((i for i, a in enumerate(starts) if a < e), default=0) for e in ends]


def tokenize_row(row: Dict, tokenizer, *, max_length: Optional[int] = None) -> Example:
    where = row.get("_source", "row")
    prompt_ids = _encode(tokenizer, format_prompt(tokenizer, row["prompt"]))
    eos = tokenizer.eos_token_id
    if row.get("response_ids") is not None:
        response_ids = list(row["response_ids"])
        if response_ids and response_ids[-1] != eos:
            response_ids.append(eos)
    else:
        response_ids = _encode(tokenizer, row["response"]) + [eos]
    if not prompt_ids:
        raise DataError(f"{where}: the prompt tokenizes to nothing")
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        raise DataError(f"{where}: {len(prompt_ids) + len(response_ids)} tokens, over "
                        f"max_length={max_length}")
    behavior = row.get("behavior_logp")
    if behavior is not None:
        behavior = list(behavior)
        if len(behavior) == len(response_ids) - 1:  # sampled without a final EOS
            behavior.append(0.0)
        if len(behavior) != len(response_ids):
            raise DataError(f"{where}: 'behavior_logp' has {len(row['behavior_logp'])} entries "
                            f"but the response has {len(response_ids)} tokens; store "
                            f"'response_ids' with it")
    rewards = [0.0] * len(response_ids)
    rewards[-1] += float(row["reward"])
    if row.get("step_rewards") is not None:
        ends = step_end_tokens(tokenizer, row["steps"], response_ids[:-1])  # without EOS
        for e, r in zip(ends, row["step_rewards"]):
            rewards[e] += float(r)
    return Example(prompt_ids, response_ids, rewards, behavior, row["prompt"], row["response"],
                   row.get("answer"), where)


def tokenize_rows(rows: Sequence[Dict], tokenizer, *, max_length=None, strict=False):
    out, errors = [], []
    for row in rows:
        try:
            out.append(tokenize_row(row, tokenizer, max_length=max_length))
        except DataError as e:
            if strict:
                raise
            log.warning("skipped bad row: %s", e)
            errors.append(str(e))
    return out, errors


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    action_mask: torch.Tensor  # [B, T] bool, response tokens
    rewards: torch.Tensor  # [B, T]
    behavior_logp: Optional[torch.Tensor]  # [B, T] or None
    ref_logp: Optional[torch.Tensor]  # [B, T] or None

    def to(self, device) -> "Batch":
        mv = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return Batch(*(mv(getattr(self, k)) for k in self.__dataclass_fields__))


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
    return Batch(ids, attn, act, rew, beh, ref)
