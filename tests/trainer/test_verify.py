"""MathVerifier: one answer that hangs costs that answer only, never the answers behind it."""
import importlib.util
import os
import time

import pytest

from dqo.tasks.verify import MathVerifier

# Module-level, so that the spawned workers can unpickle them (they import this file).


def _fake_check(pred: str, gold: str) -> bool:
    """Stands in for math-verify: "hang" never returns, "crash" kills its worker, "slowN:x"
    takes N tenths of a second to check x."""
    if pred == "hang":
        time.sleep(600)
    if pred.startswith("slow"):
        tenths, pred = pred[4:].split(":")
        time.sleep(int(tenths) / 10)
    if pred == "crash":
        os._exit(3)
    return pred == gold


def _boxed(xs):
    return [f"so the answer is \\boxed{{{x}}}" for x in xs]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hanging_answer_costs_only_itself(workers):
    preds = ["1", "2", "hang", "4", "5", "x", "7", "y", "9"]
    golds = ["1", "2", "3", "4", "5", "6", "7", "8", "9"]
    v = MathVerifier(workers=workers, timeout=1.5, worker=_fake_check, init=None)
    try:
        t0 = time.monotonic()
        got = v(_boxed(preds), golds)
        took = time.monotonic() - t0
        assert got == [True, True, False, True, True, False, True, False, True]
        assert took < 30, took  # the hung worker was killed after its 1.5 s, not waited on
        # the killed worker was replaced: a second batch on the same verifier works
        assert v(_boxed(["1", "hang", "3"]), ["1", "2", "3"]) == [True, False, True]
    finally:
        v.close()


def test_timeout_runs_from_when_an_answer_starts_not_from_submission():
    # one worker, six answers of 0.4 s each: the last one starts 2 s after submission, past
    # the 1.5 s timeout, yet none of them may be counted as timed out
    v = MathVerifier(workers=1, timeout=1.5, worker=_fake_check, init=None)
    try:
        assert v(_boxed([f"slow4:{k}" for k in range(6)]), [f"{k}" for k in range(6)]) == [True] * 6
    finally:
        v.close()


def test_no_boxed_answer_is_wrong_without_a_worker():
    v = MathVerifier(worker=_fake_check, init=None)
    assert v(["no box here", ""], ["1", "2"]) == [False, False]
    assert v._procs == []  # nothing to check: no process was started


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                    reason="math-verify not installed (the train extra)")
def test_real_math_verify():
    v = MathVerifier(timeout=60)
    try:
        got = v(["\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{3}}"], ["0.5", "\\boxed{0.5}"])
        assert got == [True, False]
    finally:
        v.close()


def test_answer_extraction_edge_cases():
    """The last marker, fractions and LaTeX's brace-less argument are read as written."""
    from dqo.tasks.verify import extract_hash_answer, last_boxed, verify_gsm8k
    assert extract_hash_answer("#### 18 #### 19") == "19"  # the last marker, on its line
    assert extract_hash_answer("work\n#### 3/4\n") == "3/4"
    assert verify_gsm8k("#### 3/4", "0.75") and not verify_gsm8k("#### 3/4", "3")
    assert extract_hash_answer("#### $1,000 dollars\nP.S. 7") == "1000"
    assert last_boxed(r"so \boxed 5$ done") == "5"
    assert last_boxed(r"\boxed  {\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \fbox{2}") == "2"
    assert last_boxed(r"\boxed") is None and last_boxed(r"\boxed{open") is None


def test_gsm8k_flexible_mode_reads_the_last_number():
    from dqo.tasks import get_verifier
    responses = ["So she has 18 eggs. The answer is 18.", "#### 17\nbut 18", "no number"]
    assert get_verifier("gsm8k")(responses, ["18"] * 3) == [False, False, False]
    assert get_verifier("gsm8k-flexible")(responses, ["18"] * 3) == [True, False, False]


def _missing_checker():
    import math_verify_that_is_not_installed  # noqa: F401


def _dies_at_start():
    os._exit(1)


def test_a_checker_that_cannot_run_is_an_error_not_wrong_answers():
    """math-verify missing in the worker, or workers that cannot start (a script without a
    __main__ guard): an error that says why, never every answer graded 0."""
    from dqo.tasks.verify import CheckerError
    v = MathVerifier(worker=_fake_check, init=_missing_checker)
    with pytest.raises(CheckerError, match="cannot run in its worker.*ModuleNotFoundError"):
        v(_boxed(["1"]), ["1"])
    v = MathVerifier(worker=_fake_check, init=_dies_at_start)
    v.max_failed_starts = 1
    with pytest.raises(CheckerError, match=r"if __name__ == '__main__'"):
        v(_boxed(["1", "2"]), ["1", "2"])


def test_a_worker_that_dies_on_an_answer_is_an_error_not_a_wrong_answer():
    """A worker killed mid-answer (a crash, the OOM killer) never checked it: a CheckerError
    naming the answer, not a 0 (it used to be graded wrong without a word)."""
    from dqo.errors import CheckerError
    v = MathVerifier(workers=1, timeout=30, worker=_fake_check, init=None)
    try:
        with pytest.raises(CheckerError, match=r"answer 1 \('crash' against '2'\) died \(exit "
                                               r"code 3\)"):
            v(_boxed(["1", "crash", "3"]), ["1", "2", "3"])
        assert v._procs == []  # closed: nothing left running
    finally:
        v.close()
