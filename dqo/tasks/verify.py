"""Answer extraction and checking for GSM8K (``#### 42``) and MATH (the last ``\\boxed{}``).

MATH answers are compared with math-verify. Its parser and verifier guard themselves with
``signal.alarm`` timeouts, which only work on a process's main thread, so they run in a small
process pool whose workers call them on their main thread; an answer that still hangs is
abandoned after ``timeout`` seconds and counted wrong.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
from fractions import Fraction
from typing import List, Optional, Sequence

_HASH = re.compile(r"####\s*([^\n]*)")
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_hash_answer(text: str) -> Optional[str]:
    """The number after the last ``####`` (GSM8K's answer marker), commas and $ removed."""
    hits = _HASH.findall(text)
    if not hits:
        return None
    m = _NUM.search(hits[-1].replace("$", ""))
    return m.group(0).replace(",", "") if m else None


def numbers_equal(a: str, b: str) -> bool:
    """Exact numeric equality of decimal strings (``"3.50" == "3.5"``, ``"1,000" == "1000"``)."""
    try:
        return Fraction(a.replace(",", "")) == Fraction(b.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return a.strip() == b.strip()


def verify_gsm8k(response: str, answer: str) -> bool:
    got = extract_hash_answer(response)
    ref = extract_hash_answer(answer) if "####" in answer else answer
    return got is not None and ref is not None and numbers_equal(got, ref)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _math_verify_worker(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse("$" + gold + "$")
    pred_parsed = parse("$" + pred + "$")
    return bool(verify(gold_parsed, pred_parsed))


class MathVerifier:
    """Batch MATH checker: last ``\\boxed{}`` of a response against the reference answer."""

    def __init__(self, workers: int = 1, timeout: float = 10.0):
        self.workers, self.timeout = workers, timeout
        self._pool: Optional[cf.ProcessPoolExecutor] = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self._pool

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> List[bool]:
        preds = [last_boxed(r) for r in responses]
        golds = [last_boxed(a) if "\\boxed" in a else a for a in answers]
        futures = {i: self._get_pool().submit(_math_verify_worker, p, g)
                   for i, (p, g) in enumerate(zip(preds, golds)) if p is not None and g}
        out = [False] * len(responses)
        for i, fut in futures.items():
            try:
                out[i] = fut.result(timeout=self.timeout)
            except cf.TimeoutError:
                self.close()  # a hung worker: start a fresh pool for the rest
            except Exception:
                out[i] = False
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        self.close()
