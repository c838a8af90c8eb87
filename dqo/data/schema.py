"""The row format: one row of a data file is one sampled response. Its one definition, imported
by the writer (:mod:`dqo.generation`, ``python -m dqo.sample``), the reader (:mod:`dqo.data.io`)
and the tokenizer (:mod:`dqo.data.tokenize`), whose :class:`Example` the collators batch
(docs/data-format.md)::

    {"prompt": "...", "response": "...", "reward": 1.0,            # required
     "answer": "42", "solution": "...",                            # optional, for evaluation, SFT
     "correct": true,                                              # optional, from dqo.sample
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
they say otherwise, and a finished text row gets the end token its text leaves implicit (the
chat template's end of turn, else EOS). Nothing else
is ever appended: a cut response has no EOS action, its last token is not terminal, and the
trainer bootstraps its return from ``V`` of the state after it (``--truncated``).

``behavior_logp`` holds the sampling policy's log-prob of every response token; it needs
``response_ids`` (the sampled tokens) unless tokenizing the response gives exactly as many
tokens. A bad row is reported with its line number and skipped, or raises with
``strict=True``; never silently dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import DataError
from ..prompts import check_prompt

# Every field of the format (docs/data-format.md). Any other column of a prompt row rides along
# into the data rows, and reaches a reward function as one of its extra ``**columns``.
RESERVED = ("prompt", "answer", "solution", "response", "response_ids", "behavior_logp",
            "finished", "reward", "correct", "steps", "step_rewards")
REQUIRED = ("prompt", "reward")  # and "response" or "steps"


def extra_columns(row: Dict) -> Dict:
    """A row's columns that are not fields of the format (a reward function's extra inputs)."""
    return {k: v for k, v in row.items() if k not in RESERVED}


def response_row(prompt, response: str, *, response_ids: List[int],
                 behavior_logp: List[float], finished: bool, reward: float, correct: bool,
                 answer: Optional[str] = None, **extra) -> Dict:
    """The row of one sampled response, as ``python -m dqo.sample`` writes it: its tokens and
    behaviour log-probs, whether it ended, its reward and label, the prompt's ``answer`` and
    its other columns (``extra``: a canonical ``solution``, a reward function's inputs)."""
    return dict(prompt=prompt, response=response, response_ids=response_ids,
                behavior_logp=behavior_logp, finished=finished, reward=reward, correct=correct,
                **({} if answer is None else {"answer": answer}), **extra)


@dataclass
class Example:
    prompt_ids: List[int]
    response_ids: List[int]
    rewards: List[float]  # per response token
    behavior_logp: Optional[List[float]] = None  # per response token
    prompt: object = ""  # the row's: text, or a conversation (dqo.prompts.prompt_key groups)
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
    for key in REQUIRED:
        if key not in row:
            raise DataError(f"{where}: missing required field {key!r}")
    row = dict(row, prompt=check_prompt(row["prompt"], f"{where}: 'prompt'"))
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
