"""Answer extraction and checking for GSM8K (``#### 42``) and MATH (the last ``\\boxed{}``).

MATH answers are compared with math-verify. Its parser and verifier guard themselves with
``signal.alarm`` timeouts, which only work on a process's main thread, so they run in worker
processes that call them on their main thread. An answer that still hangs ``timeout`` seconds
after its worker started on it is counted wrong and that worker alone is killed and replaced:
the answers queued behind it are still checked. A checker that cannot run (math-verify
missing, workers that cannot start, a worker that dies while checking an answer) is a
:class:`~dqo.errors.CheckerError`, never an answer graded wrong.
"""
from __future__ import annotations

import multiprocessing as mp
import re
import time
from collections import deque
from fractions import Fraction
from multiprocessing.connection import wait
from typing import Callable, List, Optional, Sequence

from ..errors import CheckerError

# a decimal number (commas, a decimal part) or a fraction of integers
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _first_number(text: str) -> Optional[str]:
    m = _NUM.search(text.replace("$", ""))
    return m.group(0).replace(",", "") if m else None


def extract_hash_answer(text: str) -> Optional[str]:
    """The number after the last ``####`` (GSM8K's answer marker) on its line, commas and $
    removed: ``#### 18 #### 19`` reads 19, ``#### 3/4`` reads 3/4."""
    if "####" not in text:
        return None
    return _first_number(text.rsplit("####", 1)[1].split("\n", 1)[0])


def extract_last_number(text: str) -> Optional[str]:
    """The last number of the text (GSM8K's flexible mode: "The answer is 18.")."""
    hits = _NUM.findall(text.replace("$", ""))
    return hits[-1].replace(",", "") if hits else None


def numbers_equal(a: str, b: str) -> bool:
    """Exact numeric equality of decimal strings and fractions (``"3.50" == "3.5"``,
    ``"1,000" == "1000"``, ``"3/4" == "0.75"``)."""
    try:
        return Fraction(a.replace(",", "")) == Fraction(b.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return a.strip() == b.strip()


def verify_gsm8k(response: str, answer: str, *, flexible: bool = False) -> bool:
    """Strict (the default, the paper's): the response's answer is the number after its last
    ``####``. Flexible: that number if the response has a ``####``, else its last number, for
    models that were not asked for the marker (verl's ``flexible`` mode)."""
    got = extract_hash_answer(response)
    if got is None and flexible:
        got = extract_last_number(response)
    ref = extract_hash_answer(answer) if "####" in answer else answer
    return got is not None and ref is not None and numbers_equal(got, ref)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces balanced;
    ``\\boxed 5`` (LaTeX's one-token argument, no braces) gives ``5``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":
        m = re.match(r"[^\s${}\\]+", text[i:])
        return m.group(0) if m else None
    if i >= len(text):
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


def _import_math_verify() -> None:
    import math_verify  # noqa: F401  (sympy takes seconds to import: not on an answer's clock)


_READY = "ready"
_BROKEN = "broken"


def _serve(conn, worker: Callable[[str, str], bool], init: Optional[Callable[[], None]]) -> None:
    """A worker process: check one (index, pred, gold) at a time, answer (index, ok)."""
    if init is not None:
        try:
            init()
        except Exception as exc:  # a checker that cannot run must never grade answers wrong
            conn.send((_BROKEN, f"{type(exc).__name__}: {exc}"))
            return
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent closed us
            return
        i, pred, gold = task
        try:
            ok = bool(worker(pred, gold))
        except ImportError as exc:  # the checker is missing, not the answer wrong
            conn.send((_BROKEN, f"{type(exc).__name__}: {exc}"))
            return
        except Exception:  # an answer the checker cannot parse is not a right one
            ok = False
        conn.send((i, ok))


class _Proc:
    """One worker process, its end of the pipe, and the answer it is checking (if any)."""

    def __init__(self, ctx, worker, init):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, worker, init), daemon=True)
        self.proc.start()
        child.close()  # so that our recv sees EOF if the worker dies
        self.spawned = time.monotonic()
        self.ready = False
        self.task: Optional[int] = None
        self.started = 0.0

    def kill(self) -> Optional[int]:
        """Stop the process; its exit code."""
        self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        return self.proc.exitcode


class MathVerifier:
    """Batch MATH checker: last ``\\boxed{}`` of a response against the reference answer.

    ``workers`` processes check answers in parallel and are kept between calls (a spawn plus
    math-verify's import costs seconds). ``worker``/``init`` replace the check and its warm-up
    (module-level functions, as they are pickled to the processes; tests use them).
    """

    # a worker that is not up after this long (import stuck, machine swapping) is replaced;
    # after this many failed starts in a row the remaining answers are counted wrong
    startup_timeout = 120.0
    max_failed_starts = 3

    def __init__(self, workers: int = 1, timeout: float = 10.0,
                 worker: Callable[[str, str], bool] = _math_verify_worker,
                 init: Optional[Callable[[], None]] = _import_math_verify):
        self.workers, self.timeout = max(1, workers), timeout
        self._worker, self._init = worker, init
        self._procs: List[_Proc] = []

    def _spawn(self) -> _Proc:
        return _Proc(mp.get_context("spawn"), self._worker, self._init)

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> List[bool]:
        preds = [last_boxed(r) for r in responses]
        golds = [last_boxed(a) if "\\boxed" in a else a for a in answers]
        todo = deque((i, p, g) for i, (p, g) in enumerate(zip(preds, golds)) if p is not None and g)
        out = [False] * len(responses)
        while len(self._procs) < min(self.workers, len(todo)):
            self._procs.append(self._spawn())
        failed_starts = 0
        while todo or any(w.task is not None for w in self._procs):
            dead: List[_Proc] = []
            for w in self._procs:  # the clock of an answer starts when a worker takes it
                if w.ready and w.task is None and todo:
                    try:
                        w.conn.send(todo[0])
                    except OSError:  # died while idle (e.g. between two calls): not its fault
                        dead.append(w)
                        continue
                    w.task, w.started = todo.popleft()[0], time.monotonic()
            deadlines = [w.started + self.timeout if w.ready else w.spawned + self.startup_timeout
                         for w in self._procs if w.task is not None or not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for conn in wait([w.conn for w in self._procs], timeout=wait_s):
                w = next(w for w in self._procs if w.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the worker died (crash, OOM kill)
                    if w.task is not None:  # mid-answer: that answer was never checked
                        task, code = w.task, w.kill()
                        self.close()
                        raise CheckerError(
                            f"MathVerifier: the worker checking answer {task} "
                            f"({preds[task][:60]!r} against {golds[task][:60]!r}) died (exit "
                            f"code {code}) before it answered; it is not graded wrong. Rerun "
                            f"(dqo.sample --resume keeps the rows written so far)") from None
                    dead.append(w)
                    continue
                if msg == _READY:
                    w.ready, failed_starts = True, 0
                elif msg[0] == _BROKEN:
                    self.close()
                    raise CheckerError(f"MathVerifier: the checker cannot run in its worker "
                                       f"process ({msg[1]}); install math-verify "
                                       f"(pip install 'math-verify>=0.7')")
                else:
                    out[msg[0]], w.task = msg[1], None
            now = time.monotonic()
            for w in self._procs:
                if w.task is not None and now >= w.started + self.timeout:
                    dead.append(w)  # hung on one answer: that answer stays False
                elif not w.ready and now >= w.spawned + self.startup_timeout:
                    dead.append(w)
            for w in dict.fromkeys(dead):  # a worker can be both dead and late
                failed_starts += not w.ready
                w.kill()
                self._procs.remove(w)
                if failed_starts > self.max_failed_starts:
                    self.close()
                    raise CheckerError(
                        f"MathVerifier: {failed_starts} worker processes in a row died or hung "
                        f"before they were ready, so {len(todo)} answers cannot be checked. "
                        f"Workers are started with 'spawn', which re-imports the main module: a "
                        f"script that grades MATH answers needs its top-level code under "
                        f"if __name__ == '__main__':")
                elif todo:
                    self._procs.append(self._spawn())
        return out

    def close(self) -> None:
        for w in self._procs:
            w.kill()
        self._procs = []

    def __del__(self):
        self.close()
