"""dqo.tasks: the synthetic arithmetic task and the GSM8K / MATH verifiers."""

import pytest

from dqo.tasks import arithmetic
from dqo.tasks.verify import MathVerifier, extract_hash_answer, last_boxed, verify_gsm8k


def test_arithmetic_task_and_exact_step_labels():
    p = arithmetic.Problem(7, (("+", 3), ("*", 2), ("-", 5)))
    assert p.prompt == "Q: 7+3*2-5=?\n" and p.answer == "15"
    assert arithmetic.parse_prompt(p.prompt) == p
    assert arithmetic.step_labels(p, p.solution) == [True] * 4
    wrong_mid = "7+3=10\n10*2=21\n21-5=16\n#### 16"
    assert arithmetic.step_labels(p, wrong_mid) == [True, False, False, False]
    assert not arithmetic.verify(wrong_mid, p.answer)
    lucky = "7+3=11\n11*2=20\n20-5=15\n#### 15"  # right answer, wrong reasoning
    assert arithmetic.verify(lucky, p.answer)
    assert arithmetic.step_labels(p, lucky) == [False] * 4
    # one label per line: a blank line keeps the state's label and skips no operation
    assert arithmetic.step_labels(p, "7+3=10\n\n10*2=20\n20-5=15\n#### 15\n") == [True] * 6
    assert arithmetic.step_labels(p, "7+3=10\n10*2=21\n\n#### 21") == [True, False, False,
                                                                          False]
    assert len(set(arithmetic.make_problems(50, 1))) == 50
    assert arithmetic.make_problems(5, 3) == arithmetic.make_problems(5, 3)


@pytest.mark.parametrize("response,answer,ok", [
    ("so 1,000 apples\n#### 1,000", "1000", True),
    ("#### $18.00", "18", True),
    ("#### -3", "-3", True),
    ("#### 3", "-3", False),
    ("The answer is 42", "42", False),  # no marker
    ("#### 5\nwait, #### 7", "7", True),  # the last marker counts
    ("#### 0.5", "1/2", True),
])
def test_gsm8k_verifier(response, answer, ok):
    assert verify_gsm8k(response, answer) is ok


def test_answer_extraction():
    assert extract_hash_answer("x\n####  12 apples") == "12"
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{a}{b_{2}}}.") == r"\frac{a}{b_{2}}"
    assert last_boxed("no box") is None


def test_math_verifier_off_the_main_thread():
    import threading
    verifier = MathVerifier(timeout=60)
    result = {}
    t = threading.Thread(target=lambda: result.update(ok=verifier(
        [r"thus \boxed{\frac{1}{2}}", r"\boxed{0.5}", r"\boxed{3}", "no answer"],
        ["0.5", r"\frac12", "4", "1"])))
    t.start()
    t.join(120)
    verifier.close()
    assert result["ok"] == [True, True, False, False]
