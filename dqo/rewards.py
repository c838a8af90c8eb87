"""Reward functions: the user's own, or a built-in task's, behind one interface.

A reward function has TRL's signature::

    def reward(prompts: list[str], completions: list[str], **columns) -> list[float]

where ``columns`` are the other fields of the prompt rows (``answer``, say), each a list
aligned with ``prompts``. ``--reward-fn SPEC`` names one: ``path/to/file.py:function`` or
``package.module:function``. A response is *correct* (for accuracy, rejection sampling, DPO's
pairs, KTO's labels) when its reward is at least ``--correct-threshold`` (default 1.0).
``--task arithmetic|gsm8k|math`` is the shorthand for the built-in verifiers, through the same
interface (reward 1.0 right, 0.0 wrong).

A user's function is contained: a call that has not returned after ``--reward-timeout``
seconds, or that raises anything at all (``SystemExit`` and ``KeyboardInterrupt`` included), is
a :class:`~dqo.errors.RewardError` naming the function and the row, never a silent exit. A
checker that cannot run (:class:`~dqo.errors.CheckerError`) passes through as itself: it is not
the function's verdict on an answer.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .errors import CheckerError, RewardError, UsageError

DEFAULT_TIMEOUT = 60.0


class _TimedOut(Exception):
    pass


class _Failed(Exception):
    """What a contained call raised, whatever its class."""

    def __init__(self, exc: BaseException):
        super().__init__(exc)
        self.exc = exc


def call_contained(fn: Callable, args, kwargs, timeout: Optional[float]):
    """``fn(*args, **kwargs)``; a ``BaseException`` it raises comes back as an ordinary
    exception (``SystemExit(0)`` must not end the command with exit code 0), and with a
    ``timeout`` (seconds, > 0) a call still running by then raises :class:`_TimedOut`.

    With a timeout the call runs on a daemon thread that is abandoned if it hangs (Python
    cannot kill a thread; the command stops on the RewardError anyway), so that a Ctrl-C,
    which reaches the main thread, still stops the run. Without one it runs here, and a
    ``KeyboardInterrupt`` is taken for the user's Ctrl-C and let through."""
    if not timeout:
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, CheckerError):
            raise
        except BaseException as exc:  # SystemExit, GeneratorExit...: the function's failure
            raise _Failed(exc) from exc
    box = {}

    def target():
        try:
            box["out"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - carried to the caller's thread
            box["exc"] = exc

    t = threading.Thread(target=target, name="reward-fn", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise _TimedOut()
    if "exc" in box:
        if isinstance(box["exc"], CheckerError):
            raise box["exc"]
        raise _Failed(box["exc"]) from box["exc"]
    return box["out"]


@dataclass
class Reward:
    fn: Callable
    name: str
    threshold: float = 1.0
    # seconds a call may take (None or 0: no limit); the built-in verifiers time themselves
    timeout: Optional[float] = None

    def scores(self, prompts: Sequence[str], completions: Sequence[str],
               columns: Optional[Dict[str, Sequence]] = None) -> List[float]:
        """One finite float a completion."""
        prompts, completions = list(prompts), list(completions)
        columns = {k: list(v) for k, v in (columns or {}).items()}
        try:
            out = call_contained(self.fn, (prompts, completions), columns, self.timeout)
        except _TimedOut:
            raise RewardError(f"reward function {self.name} did not return within "
                              f"{self.timeout:g} s (--reward-timeout) on {len(prompts)} "
                              f"completions of prompt {prompts[0][:60]!r}") from None
        except _Failed as failed:
            exc = failed.exc
            raise RewardError(f"reward function {self.name} failed"
                              f"{self._failing_row(prompts, completions, columns)}: "
                              f"{type(exc).__name__}: {exc}") from exc
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
            raise RewardError(f"reward function {self.name}: expected a list of "
                              f"{len(prompts)} numbers, got {type(out).__name__}")
        out = list(out)
        if len(out) != len(prompts):
            raise RewardError(f"reward function {self.name}: expected {len(prompts)} rewards "
                              f"(one a completion), got {len(out)}")
        for i, x in enumerate(out):
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
                raise RewardError(f"reward function {self.name}: row {i} (prompt "
                                  f"{prompts[i][:60]!r}): expected a finite number, got {x!r}")
        return [float(x) for x in out]

    def correct(self, scores: Sequence[float]) -> List[bool]:
        return [s >= self.threshold for s in scores]

    def _failing_row(self, prompts, completions, columns) -> str:
        """Which row makes the function raise, found by calling it row by row."""
        for i in range(len(prompts)):
            try:
                call_contained(self.fn, ([prompts[i]], [completions[i]]),
                               {k: [v[i]] for k, v in columns.items()}, self.timeout)
            except _Failed:
                return f" on row {i} (prompt {prompts[i][:60]!r})"
            except _TimedOut:  # no use waiting out the rest one by one
                return ""
        return ""


def load_reward(spec: str, threshold: float = 1.0,
                timeout: Optional[float] = DEFAULT_TIMEOUT) -> Reward:
    """``path/to/file.py:function`` or ``package.module:function`` -> :class:`Reward`, each
    call limited to ``timeout`` seconds (None or 0: no limit)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardError(f"--reward-fn: expected path/to/file.py:function or "
                          f"package.module:function, got {spec!r}")
    if where.endswith(".py") or "/" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise RewardError(f"--reward-fn: no such file: {where}")
        module_spec = importlib.util.spec_from_file_location(f"_dqo_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except BaseException as exc:  # a sys.exit() at import is no reason to exit 0
            raise RewardError(f"--reward-fn: importing {where} failed: {type(exc).__name__}: "
                              f"{exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise RewardError(f"--reward-fn: cannot import {where}: {exc}") from exc
        except BaseException as exc:
            raise RewardError(f"--reward-fn: importing {where} failed: {type(exc).__name__}: "
                              f"{exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"--reward-fn: {where} has no function {name!r}")
    return Reward(fn, spec, threshold, timeout or None)


def task_reward(task: str, threshold: float = 1.0) -> Reward:
    """A built-in task's verifier as a reward function: 1.0 if the answer is right."""
    from .tasks import get_verifier

    verify = get_verifier(task)

    def reward(prompts, completions, answer, **_):
        return [float(ok) for ok in verify(completions, answer)]

    return Reward(reward, f"--task {task}", threshold)


def as_reward(verify) -> Reward:
    """A :class:`Reward`, or a legacy ``verify(responses, answers) -> list[bool]`` wrapped as
    one (reward 1.0 right, 0.0 wrong)."""
    if isinstance(verify, Reward):
        return verify

    def reward(prompts, completions, answer, **_):
        return [float(ok) for ok in verify(completions, answer)]

    return Reward(reward, getattr(verify, "__name__", "verifier"))


def reward_from_args(args) -> Reward:
    """The reward a command line names (``args``: its ``task``, ``reward_fn``,
    ``correct_threshold``, ``reward_timeout``); exactly one of --task and --reward-fn."""
    if args.reward_fn and args.task:
        raise UsageError("--reward-fn and --task: give one of them")
    if args.reward_fn:
        try:
            return load_reward(args.reward_fn, args.correct_threshold,
                               getattr(args, "reward_timeout", DEFAULT_TIMEOUT))
        except RewardError as exc:
            raise UsageError(str(exc)) from None
    if not args.task:
        raise UsageError("--task or --reward-fn: give one of them (what grades a response)")
    return task_reward(args.task, args.correct_threshold)
