"""A synthetic multi-step arithmetic task that ships with the project.

A problem is a start value and a chain of operations; the reference solution does one
operation per line and ends with the answer after ``####`` (GSM8K's format)::

    prompt:   Q: 7+3*2-5=?
    solution: 7+3=10
              10*2=20
              20-5=15
              #### 15

Operations apply left to right (a chain, not operator precedence), so every line is one
checkable step and the exact correctness of every step of any response is known: step i is
correct iff its line is ``a<op>b=c`` with ``a`` the true running value before step i, ``<op>b``
the problem's i-th operation and ``c`` its true result.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .verify import extract_hash_answer, numbers_equal

OPS = ("+", "-", "*")
_STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple  # ((op, operand), ...)

    @property
    def prompt(self) -> str:
        return "Q: " + str(self.start) + "".join(f"{o}{b}" for o, b in self.ops) + "=?\n"

    def values(self) -> List[int]:
        """Running values: [start, after op 1, ..., after op n]."""
        vals = [self.start]
        for o, b in self.ops:
            vals.append(apply(vals[-1], o, b))
        return vals

    @property
    def answer(self) -> str:
        return str(self.values()[-1])

    @property
    def solution(self) -> str:
        vals = self.values()
        lines = [f"{vals[i]}{o}{b}={vals[i + 1]}" for i, (o, b) in enumerate(self.ops)]
        return "\n".join(lines + [f"#### {vals[-1]}"])


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_problems(n: int, seed: int, min_steps: int = 2, max_steps: int = 3,
                  max_operand: int = 9) -> List[Problem]:
    """``n`` distinct random problems (same seed, same problems)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        k = rng.randint(min_steps, max_steps)
        ops = []
        for _ in range(k):
            op = rng.choice(OPS)
            ops.append((op, rng.randint(2, 3) if op == "*" else rng.randint(1, max_operand)))
        p = Problem(rng.randint(1, max_operand), tuple(ops))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def verify(response: str, answer: str) -> bool:
    """Outcome check: the number after ``####`` equals the reference answer."""
    got = extract_hash_answer(response)
    return got is not None and numbers_equal(got, answer)


def step_labels(problem: Problem, response: str) -> List[bool]:
    """Exact correctness of every line of ``response`` (its steps in the data format, blank
    lines included, so label i belongs to ``response.split("\\n")[i]``); see the module
    docstring. A step after a wrong one is wrong; the final ``####`` line is correct iff the
    outcome is. A blank line is no step of the solution: it keeps the label of the state it
    follows and does not advance the operation index."""
    vals = problem.values()
    labels, ok, i = [], True, 0  # i: non-blank lines so far
    for line in response.split("\n"):
        if not line.strip():
            labels.append(ok)
            continue
        i += 1
        if line.startswith("####"):
            labels.append(ok and verify(line, problem.answer))
            continue
        m = _STEP.match(line)
        if not (ok and m and i <= len(problem.ops)):
            ok = False
        else:
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            ok = (a == vals[i - 1] and (op, b) == problem.ops[i - 1] and c == vals[i])
        labels.append(ok)
    return labels


def parse_prompt(prompt: str) -> Optional[Problem]:
    """The problem a prompt was made from (None if it is not one of this task's prompts)."""
    m = re.fullmatch(r"Q: (\d+)((?:[+\-*]\d+)+)=\?\n?", prompt)
    if not m:
        return None
    ops = tuple((o, int(b)) for o, b in re.findall(r"([+\-*])(\d+)", m.group(2)))
    return Problem(int(m.group(1)), ops)


def prompt_step_labels(prompt, response: str) -> Optional[List[bool]]:
    """:func:`step_labels` of ``response`` when ``prompt`` is one of this task's problems (text
    :func:`parse_prompt` reads); None for any other prompt."""
    problem = parse_prompt(prompt) if isinstance(prompt, str) else None
    return None if problem is None else step_labels(problem, response)


def reference_pairs(problems: Sequence[Problem]):
    return [(p.prompt, p.solution) for p in problems]
