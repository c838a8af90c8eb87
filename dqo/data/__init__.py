"""Offline data: jsonl rows -> tokenized examples -> padded ``[B, T]`` batches.

One jsonl row is one sampled response::

    {"prompt": "...", "response": "...", "reward": 1.0,            # required
     "answer": "42",                                               # optional, for evaluation
     "steps": ["step 1", "step 2"], "step_rewards": [0.1, 0.0],    # optional process rewards
     "response_ids": [..], "behavior_logp": [..],                  # optional, from dqo.sample
     "finished": true}                                             # optional, from dqo.sample

``steps`` follow TRL's stepwise convention: the response is the steps joined by ``"\\n"`` (give
either, or both if they agree), and ``step_rewards[i]`` is placed on the last token of step i.
The outcome ``reward`` goes on the last response token.

``finished`` says whether the response ended (with a stop token, or as the environment
decided) or was cut at a length limit. Rows with ``response_ids`` are trained on exactly those
tokens; without ``finished`` they count as finished when their last id is a stop token (EOS,
the generation config's, the chat template's end of turn). Text-only rows are finished unless
they say otherwise, and a finished text row gets the EOS its text leaves implicit. Nothing else
is ever appended: a cut response has no EOS action, its last token is not terminal, and the
trainer bootstraps its return from ``V`` of the state after it (``--truncated``).

``behavior_logp`` holds the sampling policy's log-prob of every response token; it needs
``response_ids`` (the sampled tokens) unless tokenizing the response gives exactly as many
tokens. A bad row is reported with its line number and skipped, or raises with
``strict=True``; never silently dropped.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..atomic import atomic_write
from ..decoding import encode_prompt
from ..errors import DataError

log = logging.getLogger(__name__)


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
    reward: float = 0.0  # the row's outcome reward
    labelled_correct: Optional[bool] = None  # the row's own 'correct' (dqo.sample writes it)
    finished: bool = True  # False: its return bootstraps (cut, and --truncated bootstrap)
    cut_to_fit: bool = False  # the response was cut here to fit max_length
    truncated: bool = False  # the response as trained did not end (cut when sampled, or here)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def correct(self) -> bool:
        """The outcome label of the baselines (RS, DPO, KTO): the row's ``correct`` (reward at
        least the sampler's ``--correct-threshold``), else a positive outcome reward; a response
        that did not end is never a correct sample."""
        label = self.reward > 0 if self.labelled_correct is None else self.labelled_correct
        return label and not self.truncated


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_row(row, where: str) -> Dict:
    """Validate one decoded row; returns it with ``response`` filled from ``steps``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "solution" in row and not isinstance(row["solution"], str):
        raise DataError(f"{where}: 'solution' must be a string")
    if "correct" in row and not isinstance(row["correct"], bool):
        raise DataError(f"{where}: 'correct' must be true or false, got {row['correct']!r}")
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
    if "finished" in row and not isinstance(row["finished"], bool):
        raise DataError(f"{where}: 'finished' must be true or false, got {row['finished']!r}")
    if row.get("response_ids") is not None and row.get("behavior_logp") is not None \
            and len(row["response_ids"]) != len(row["behavior_logp"]):
        raise DataError(f"{where}: 'behavior_logp' has {len(row['behavior_logp'])} entries, "
                        f"'response_ids' {len(row['response_ids'])}")
    return dict(row, _source=where)


def _lines(path) -> Iterator[Tuple[str, object]]:
    """``("path:lineno", line)`` for every non-blank line of a jsonl file; a line that is not
    UTF-8 comes as a DataError in place of its text (one bad line, not a bad file)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                yield where, line


def _parse(where: str, line):
    if isinstance(line, DataError):
        raise line
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None


TABLE_FORMATS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _table_rows(path) -> Iterator[Tuple[str, object]]:
    """``("path:row N", row)`` of a json, parquet or csv file or a saved ``datasets``
    directory, read with the ``datasets`` library (the formats of the Hub)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading anything but jsonl needs the datasets package "
                        f"(pip install datasets)") from None
    p = Path(path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):  # a saved DatasetDict: its train split
            if "train" not in ds and len(ds) != 1:
                raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; save the split "
                                f"to use alone")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    elif p.suffix in TABLE_FORMATS:
        try:
            ds = datasets.load_dataset(TABLE_FORMATS[p.suffix], data_files=str(p),
                                       split="train")
        except Exception as exc:  # a malformed file: one error that names it
            raise DataError(f"{path}: not readable as {TABLE_FORMATS[p.suffix]} "
                            f"({type(exc).__name__}: {exc})") from None
    else:
        raise DataError(f"{path}: expected a .jsonl, .json, .parquet or .csv file or a saved "
                        f"datasets directory")
    for i, row in enumerate(ds, 1):
        yield f"{path}:row {i}", dict(row)


def _records(path) -> Iterator[Tuple[str, object]]:
    """``(where, object or the DataError of its line)`` of a data file in any format: jsonl
    line by line (a bad line is one bad row), the others with ``datasets``."""
    if Path(path).is_file() and Path(path).suffix == ".jsonl":
        for where, line in _lines(path):
            try:
                yield where, _parse(where, line)
            except DataError as e:
                yield where, e
    else:
        yield from _table_rows(path)


def read_jsonl(path, *, strict: bool = False) -> Tuple[List[Dict], List[str]]:
    """Rows of a data file (jsonl, json, parquet, csv or a saved ``datasets`` directory) and
    the errors of the rows that were skipped."""
    rows, errors = [], []
    for where, obj in _records(path):
        try:
            if isinstance(obj, DataError):
                raise obj
            rows.append(check_row(obj, where))
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


PROMPT_COLUMNS = ("prompt", "question", "problem")  # ours, GSM8K's, MATH's
ANSWER_COLUMNS = ("answer", "solution")


def prompt_row(obj: Dict, where: str, *, prompt_column: Optional[str] = None,
               answer_column: Optional[str] = None, require_answer: bool = True) -> Dict:
    """One prompt row in our fields: ``prompt``, ``answer``, ``solution`` (strings) and every
    other field as it is. Columns: ``prompt_column``, else the first of prompt, question
    (GSM8K), problem (MATH); ``answer_column``, else answer, else solution. A worked answer
    (GSM8K's, ending in ``#### N``; MATH's, with a last ``\\boxed{N}``) gives answer N and
    becomes the prompt's canonical ``solution``."""
    from ..tasks.verify import extract_hash_answer, last_boxed

    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    pc = prompt_column or next((c for c in PROMPT_COLUMNS if c in obj), None)
    if pc is None or pc not in obj:
        raise DataError(f"{where}: no prompt column ({prompt_column or ', '.join(PROMPT_COLUMNS)}"
                        f"); found {sorted(obj)}; name it with --prompt-column")
    ac = answer_column or next((c for c in ANSWER_COLUMNS if c in obj), None)
    if require_answer and (ac is None or ac not in obj or obj[ac] is None):
        raise DataError(f"{where}: no answer column ({answer_column or ', '.join(ANSWER_COLUMNS)}"
                        f"); found {sorted(obj)}; name it with --answer-column")
    row = {k: v for k, v in obj.items() if k not in (pc, ac)}
    row["prompt"] = str(obj[pc])
    if ac is not None and obj.get(ac) is not None:
        text = str(obj[ac])
        worked = extract_hash_answer(text) if "####" in text else last_boxed(text)
        if worked is not None and worked != text.strip():
            row["answer"] = worked
            row.setdefault("solution", text)
        else:
            row["answer"] = text
        if ac == "solution":  # a column named solution is one, worked answer or not
            row["solution"] = text
    if "solution" in row:
        row["solution"] = str(row["solution"])
    return row


def read_prompt_rows(path, require_answer: bool = True, *, prompt_column: Optional[str] = None,
                     answer_column: Optional[str] = None) -> List[Dict]:
    """Rows of a prompts file (jsonl, json, parquet, csv or a saved ``datasets`` directory), as
    :func:`prompt_row` reads them: ``prompt``, ``answer`` (needed by the built-in tasks'
    verifiers, optional for a user's reward function), where given ``solution`` (a worked
    canonical solution, what ``--algo sft`` trains on), and every other field as it is (a
    reward function's extra columns)."""
    rows = []
    for where, obj in _records(path):
        if isinstance(obj, DataError):
            raise obj
        rows.append(prompt_row(obj, where, prompt_column=prompt_column,
                               answer_column=answer_column, require_answer=require_answer))
    return rows


def read_prompts(path) -> Tuple[List[str], List[str]]:
    """``prompt`` and ``answer`` of every row of a prompts file (for sampling and evaluation)."""
    rows = read_prompt_rows(path)
    return [r["prompt"] for r in rows], [r["answer"] for r in rows]


def read_solutions(path) -> List[Dict]:
    """An ``--sft-data`` file: rows of ``prompt`` and ``solution`` (``answer`` optional), in
    any format :func:`read_prompt_rows` reads (GSM8K's question/answer included)."""
    rows = []
    for where, obj in _records(path):
        if isinstance(obj, DataError):
            raise obj
        row = prompt_row(obj, where, require_answer=False) if isinstance(obj, dict) else obj
        if not (isinstance(row, dict) and isinstance(row.get("solution"), str)):
            raise DataError(f"{where}: expected an object with string 'prompt' and 'solution'")
        rows.append(dict(row, _source=where))
    return rows


def sft_rows(rows: Sequence[Dict], source: str) -> List[Dict]:
    """SFT's training rows: each prompt's canonical ``solution`` (once per prompt), never the
    sampled responses. A DataError if no row has a solution."""
    out, seen = [], set()
    for r in rows:
        sol = r.get("solution")
        if isinstance(sol, str) and sol and r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append(dict(prompt=r["prompt"], response=sol, reward=1.0,
                            answer=r.get("answer"), _source=r.get("_source", source)))
    if not out:
        raise DataError(f"{source}: no row has a 'solution': --algo sft trains on canonical "
                        f"solutions (a 'solution' field on the prompt rows, which dqo.sample "
                        f"copies into the data, or --sft-data FILE with prompt and solution), "
                        f"never on sampled responses (--algo rs trains on the correct ones)")
    return out


def write_jsonl(path, rows: Iterable[Dict]) -> None:
    """Write rows atomically (a partial file is never left under ``path``)."""
    def write(f):
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")

    atomic_write(path, write)


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenized(where: str, what: str, fn):
    """``fn()``; a tokenizer that fails on a row's text is a DataError naming the row."""
    try:
        return fn()
    except DataError:
        raise
    except Exception as e:  # tokenizers raise many types (unknown characters, huge inputs)
        raise DataError(f"{where}: the tokenizer failed on the {what} "
                        f"({type(e).__name__}: {e})") from None


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


def tokenize_row(row: Dict, tokenizer, *, max_length: Optional[int] = None,
                 stop_ids: Optional[Sequence[int]] = None) -> Example:
    """One row as token ids, per-token rewards and behaviour log-probs (see the module
    docstring). ``stop_ids``: the tokens that end a response (default: the tokenizer's EOS).
    A row over ``max_length`` keeps its whole prompt and as much of its response as fits, and
    is then unfinished; a prompt that alone does not fit is a DataError."""
    where = row.get("_source", "row")
    prompt_ids = _tokenized(where, "prompt", lambda: encode_prompt(tokenizer, row["prompt"]))
    if not prompt_ids:
        raise DataError(f"{where}: the prompt tokenizes to nothing")
    eos = tokenizer.eos_token_id
    stops = set(stop_ids) if stop_ids is not None else {eos}
    if row.get("response_ids") is not None:
        response_ids = list(row["response_ids"])
        vocab = len(tokenizer)
        if max(response_ids) >= vocab:
            bad = next(i for i in response_ids if i >= vocab)
            raise DataError(f"{where}: 'response_ids' holds {bad}, outside the tokenizer's "
                            f"vocabulary of {vocab} (sampled with another model?)")
        finished = row.get("finished", response_ids[-1] in stops)
        body = response_ids[:-1] if response_ids[-1] in stops else response_ids
    else:
        body = _tokenized(where, "response", lambda: _encode(tokenizer, row["response"]))
        finished = row.get("finished", True)
        response_ids = body + [eos] if finished else list(body)
        if not response_ids:
            raise DataError(f"{where}: the response tokenizes to nothing and did not finish")
    behavior = row.get("behavior_logp")
    if behavior is not None and len(behavior) != len(response_ids):
        raise DataError(f"{where}: 'behavior_logp' has {len(behavior)} entries but the "
                        f"response has {len(response_ids)} tokens"
                        + (" (with the EOS of a finished text row)" if "response_ids" not in row
                           and finished else "")
                        + "; store 'response_ids' with it (dqo.sample does)")
    rewards = [0.0] * len(response_ids)
    rewards[-1] += float(row["reward"])
    if row.get("step_rewards") is not None:
        ends = step_end_tokens(tokenizer, row["steps"], body)
        for e, r in zip(ends, row["step_rewards"]):
            rewards[e] += float(r)
    ex = Example(prompt_ids, response_ids, rewards, None if behavior is None else list(behavior),
                 row["prompt"], row["response"], row.get("answer"), where,
                 reward=float(row["reward"]), labelled_correct=row.get("correct"),
                 finished=bool(finished), truncated=not finished)
    if max_length is not None and len(ex) > max_length:
        fits = max_length - len(prompt_ids)
        if fits < 1:
            raise DataError(f"{where}: the prompt alone has {len(prompt_ids)} tokens, "
                            f"max_length={max_length} leaves no room for a response")
        ex.response_ids, ex.rewards = ex.response_ids[:fits], ex.rewards[:fits]
        if ex.behavior_logp is not None:
            ex.behavior_logp = ex.behavior_logp[:fits]
        ex.finished, ex.cut_to_fit, ex.truncated = False, True, True
    return ex


def tokenize_rows(rows: Sequence[Dict], tokenizer, *, max_length=None, strict=False,
                  stop_ids=None):
    out, errors = [], []
    for row in rows:
        try:
            out.append(tokenize_row(row, tokenizer, max_length=max_length, stop_ids=stop_ids))
        except DataError as e:
            if strict:
                raise
            log.warning("skipped bad row: %s", e)
            errors.append(str(e))
    cut = sum(e.cut_to_fit for e in out)
    if cut:
        log.warning("%d of %d responses cut to fit max_length=%s (trained as unfinished)", cut,
                    len(out), max_length)
    return out, errors


TRUNCATED_POLICIES = ("bootstrap", "drop", "penalize")


def apply_truncated_policy(examples: List[Example], policy: str = "bootstrap",
                           reward: float = 0.0) -> Tuple[List[Example], Dict[str, int]]:
    """What unfinished responses (cut when sampled, or to fit max_length) become:
    ``bootstrap``: kept as they are, their return bootstraps from V of the state after their
    last token; ``drop``: removed (DAPO's overlong filtering); ``penalize``: their last token is
    terminal with ``reward`` added to it. Returns the examples and counts for the summary."""
    if policy not in TRUNCATED_POLICIES:
        raise ValueError(f"truncated: expected one of {TRUNCATED_POLICIES}, got {policy!r}")
    unfinished = [e for e in examples if not e.finished]
    counts = dict(examples=len(examples), unfinished=len(unfinished),
                  cut_to_fit=sum(e.cut_to_fit for e in examples))
    if policy == "drop":
        examples = [e for e in examples if e.finished]
    elif policy == "penalize":
        examples = [e if e.finished else replace(
            e, rewards=e.rewards[:-1] + [e.rewards[-1] + float(reward)], finished=True)
            for e in examples]
    return examples, counts


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
