"""Users' own reward functions (TRL's signature) through dqo.sample, dqo.train and
dqo.evaluate; the built-in tasks through the same interface."""
import json
import textwrap

import pytest
import torch

from dqo import data as D
from dqo.cli import UsageError
from dqo.rewards import RewardError, load_reward, task_reward

REWARD_FILE = textwrap.dedent("""
    def partial_credit(prompts, completions, answer, weight, **_):
        # 1.0 for the right final answer, else `weight` times the share of digits written
        out = []
        for c, a, w in zip(completions, answer, weight):
            right = c.strip().endswith(a)
            out.append(1.0 if right else w * sum(ch.isdigit() for ch in c) / max(1, len(c)))
        return out

    def wrong_length(prompts, completions, **_):
        return [0.0]

    def not_a_number(prompts, completions, **_):
        return ["high"] * len(prompts)

    def fails_on_empty(prompts, completions, **_):
        return [1.0 / len(c) for c in completions]
""")


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def test_a_reward_file_is_loaded_and_scored(reward_file):
    r = load_reward(f"{reward_file}:partial_credit", threshold=1.0)
    scores = r.scores(["Q1", "Q2"], ["#### 4", "12ab"], {"answer": ["4", "7"],
                                                        "weight": [0.5, 0.5]})
    assert scores == [1.0, 0.25] and r.correct(scores) == [True, False]
    builtin = task_reward("arithmetic")
    assert builtin.scores(["Q"], ["#### 15"], {"answer": ["15"]}) == [1.0]


@pytest.mark.parametrize("name, message", [
    ("wrong_length", r"wrong_length: expected 2 rewards \(one a completion\), got 1"),
    ("not_a_number", r"not_a_number: row 0 \(prompt 'Q1'\): expected a finite number, got "
                     r"'high'"),
    ("fails_on_empty", r"fails_on_empty failed on row 1 \(prompt 'Q2'\): ZeroDivisionError"),
])
def test_a_bad_reward_function_names_itself_and_the_row(reward_file, name, message):
    r = load_reward(f"{reward_file}:{name}")
    with pytest.raises(RewardError, match=message):
        r.scores(["Q1", "Q2"], ["ab", ""], {})


def test_bad_reward_specs(reward_file, tmp_path):
    for spec, message in ((str(reward_file), "expected path/to/file.py:function"),
                          (f"{tmp_path}/none.py:f", "no such file"),
                          (f"{reward_file}:missing", "has no function 'missing'"),
                          ("no_such_package_xyz:f", "cannot import no_such_package_xyz")):
        with pytest.raises(RewardError, match=message):
            load_reward(spec)


def test_user_reward_and_a_parquet_file_through_sample_train_evaluate(reward_file, tmp_path,
                                                                      capsys):
    from dqo import evaluate, sample
    from dqo import train as train_cli
    from dqo.modeling import build_policy, tiny_config
    from dqo.tasks import arithmetic
    from dqo.tokenizer import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    policy = build_policy(tiny_config(tok, hidden_size=32, layers=2, heads=2))
    model_dir = tmp_path / "base"
    policy.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    datasets = pytest.importorskip("datasets")
    prompts = tmp_path / "prompts.parquet"  # a Hub format, read with the datasets library
    datasets.Dataset.from_list([dict(prompt=p.prompt, answer=p.answer, weight=0.5)
                                for p in arithmetic.make_problems(4, 9)]).to_parquet(str(prompts))
    data = tmp_path / "data.jsonl"
    spec = f"{reward_file}:partial_credit"
    sample.main(["--model", str(model_dir), "--prompts", str(prompts), "--reward-fn", spec,
                 "--n", "2", "--max-new-tokens", "8", "--out", str(data)])
    rows, _ = D.read_jsonl(data, strict=True)
    assert len(rows) == 8 and all(r["weight"] == 0.5 for r in rows)  # its column rides along
    for r in rows:  # the function's float rewards; correct = reward >= 1.0 and ended
        assert 0.0 <= r["reward"] <= 1.0 and r["correct"] == (r["reward"] >= 1.0)
    out = tmp_path / "run"
    train_cli.main(["--model", str(model_dir), "--data", str(data), "--reward-fn", spec,
                    "--eval-data", str(prompts), "--eval-samples", "1", "--max-steps", "1",
                    "--batch-size", "4", "--micro-batch", "4", "--engine", "torch",
                    "--out", str(out), "--no-progress"])
    evaluate.main(["--model", str(out / "final" / "policy"), "--data", str(prompts),
                   "--reward-fn", spec, "--correct-threshold", "0.1", "--samples", "1"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 4 and 0 <= res["greedy"] <= 1


def test_task_or_reward_fn_exactly_one(reward_file):
    from argparse import Namespace

    from dqo.rewards import reward_from_args
    with pytest.raises(UsageError, match="give one of them"):
        reward_from_args(Namespace(task="gsm8k", reward_fn=f"{reward_file}:partial_credit",
                                   correct_threshold=1.0))
    with pytest.raises(UsageError, match="--task or --reward-fn"):
        reward_from_args(Namespace(task=None, reward_fn=None, correct_threshold=1.0))


CONTAINED = textwrap.dedent("""
    import time

    def hangs(prompts, completions, **_):
        time.sleep(30)

    def exits(prompts, completions, **_):
        raise SystemExit(0)

    def interrupts(prompts, completions, **_):
        raise KeyboardInterrupt

    def slow(prompts, completions, **_):
        time.sleep(2)
        return [1.0] * len(prompts)
""")


@pytest.fixture
def contained(tmp_path):
    path = tmp_path / "contained.py"
    path.write_text(CONTAINED)
    return path


def test_a_hanging_reward_function_times_out_naming_itself(contained):
    r = load_reward(f"{contained}:hangs", timeout=0.3)
    with pytest.raises(RewardError, match=r"contained.py:hangs did not return within 0.3 s "
                                          r"\(--reward-timeout\) on 2 completions of prompt 'Q1'"):
        r.scores(["Q1", "Q1"], ["a", "b"], {})


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("name, raised", [("exits", "SystemExit: 0"),
                                          ("interrupts", "KeyboardInterrupt")])
def test_any_base_exception_of_a_reward_function_is_a_reward_error(contained, name, raised,
                                                                   timeout):
    """SystemExit(0) used to end dqo.sample with exit code 0 and no output."""
    r = load_reward(f"{contained}:{name}", timeout=timeout)
    if timeout is None and name == "interrupts":  # in the main thread: taken for a Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            r.scores(["Q1"], ["a"], {})
        return
    with pytest.raises(RewardError, match=rf"{name} failed on row 0 \(prompt 'Q1'\): {raised}"):
        r.scores(["Q1"], ["a"], {})


def test_ctrl_c_while_a_reward_function_runs_stops_the_run(contained):
    """The function runs on a thread of its own (for its timeout): a Ctrl-C reaches the main
    thread and stops the run as a KeyboardInterrupt, not as the function's failure."""
    import os
    import signal
    import threading

    r = load_reward(f"{contained}:slow", timeout=10)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        r.scores(["Q1"], ["a"], {})


def _no_checker():
    import math_verify_that_is_not_installed  # noqa: F401


def _unused_check(pred, gold):
    return pred == gold


def test_a_checker_that_cannot_import_is_a_checker_error_not_zero(monkeypatch):
    """--task math whose worker cannot import math-verify: a CheckerError, never a reward
    of 0.0 for every answer, nor a RewardError that blames the answers."""
    import dqo.tasks
    from dqo.errors import CheckerError
    from dqo.tasks.verify import MathVerifier

    verifier = MathVerifier(worker=_unused_check, init=_no_checker)
    monkeypatch.setattr(dqo.tasks, "get_verifier", lambda name: verifier)
    try:
        with pytest.raises(CheckerError, match="cannot run in its worker.*ModuleNotFoundError"):
            task_reward("math").scores(["Q"], ["\\boxed{1}"], {"answer": ["1"]})
    finally:
        verifier.close()
