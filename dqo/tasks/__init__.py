"""Tasks: prompts, reference answers and verifiers. ``get_verifier(name)`` returns a function
``(responses, answers) -> list[bool]``."""
from __future__ import annotations

from typing import Callable, List, Sequence

from . import arithmetic
from .verify import MathVerifier, verify_gsm8k

# gsm8k: the answer after "####" (strict, the paper's); gsm8k-flexible: else the last number
TASKS = ("arithmetic", "gsm8k", "gsm8k-flexible", "math")


def get_verifier(name: str) -> Callable[[Sequence[str], Sequence[str]], List[bool]]:
    if name == "arithmetic":
        return lambda rs, ans: [arithmetic.verify(r, a) for r, a in zip(rs, ans)]
    if name == "gsm8k":
        return lambda rs, ans: [verify_gsm8k(r, a) for r, a in zip(rs, ans)]
    if name == "gsm8k-flexible":
        return lambda rs, ans: [verify_gsm8k(r, a, flexible=True) for r, a in zip(rs, ans)]
    if name == "math":
        return MathVerifier()
    raise ValueError(f"task: expected one of {TASKS}, got {name!r}")
