"""dqo.sample survives a kill: rows are on disk batch by batch, --resume ends with the bytes of
an uninterrupted run; the decoding record comes before the rows; bad prompts stop it before any
sampling; a reward function's failure keeps what was graded before it."""
import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dqo import data as D
from dqo import sample
from dqo.data.partial import PartialRows, partial_dir
from dqo.decoding import DecodingConfig
from dqo.errors import DataError, RewardError, UsageError
from dqo.generation import generate
from dqo.generation.hf import RowSampler, uniforms
from dqo.tasks import arithmetic

ROOT = Path(__file__).resolve().parents[2]

# called once a prompt (its n completions); the environment decides when it misbehaves
REWARDS = textwrap.dedent("""
    import os, signal
    CALLS = [0]

    def flaky(prompts, completions, answer, **_):
        CALLS[0] += 1
        if os.environ.get("DQO_TEST_KILL_AT") == str(CALLS[0]):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("DQO_TEST_FAIL_AT") == str(CALLS[0]):
            raise ValueError("grader broke")
        return [float(c.strip().endswith(a)) for c, a in zip(completions, answer)]

    def exits(prompts, completions, **_):
        raise SystemExit(0)
""")


@pytest.fixture
def setup(tok, policy, tmp_path, monkeypatch):
    # one thread here and in the subprocesses: CPU reductions split over another number of
    # threads round differently (a dqo.train test before this one may have fitted the count)
    import dqo.threads
    monkeypatch.setattr(dqo.threads, "_fitter", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tmp_path / "base"
    policy.save_pretrained(model)
    tok.save_pretrained(model)
    prompts = tmp_path / "prompts.jsonl"
    D.write_jsonl(prompts, [dict(prompt=p.prompt, answer=p.answer)
                            for p in arithmetic.make_problems(6, 3)])
    (tmp_path / "rewards.py").write_text(REWARDS)
    yield tmp_path
    torch.set_num_threads(threads)


def argv(tmp_path, out, fn="flaky", *extra):
    # 6 prompts x 3 samples in batches of 4: batches straddle prompts
    return ["--model", str(tmp_path / "base"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--reward-fn", f"{tmp_path / 'rewards.py'}:{fn}", "--n", "3",
            "--generation-batch-size", "4", "--max-new-tokens", "8", "--seed", "5",
            "--out", str(out), *extra]


def reference(tmp_path) -> bytes:
    ref = tmp_path / "ref" / "data.jsonl"
    sample.main(argv(tmp_path, ref))
    assert len(ref.read_text().splitlines()) == 18 and not partial_dir(ref).exists()
    return ref.read_bytes()


def test_a_sigkilled_sample_resumes_to_the_same_bytes(setup, monkeypatch):
    """Killed (SIGKILL, from inside its 4th reward call) after two batches were written: the
    rows so far and the decoding record are on disk, the data file is not; --resume ends
    with the bytes of an uninterrupted run (it used to keep nothing)."""
    out = setup / "data.jsonl"
    env = dict(os.environ, DQO_TEST_KILL_AT="4", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "dqo.sample", *argv(setup, out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    kept = (partial_dir(out) / "rows.jsonl").read_text().splitlines()
    assert len(kept) == 6  # prompts 1 and 2 (3 samples each), written before prompt 4's grading
    DecodingConfig.load(setup / "data.decoding.json")  # written before the rows
    with pytest.raises(UsageError, match=r"holds 6 rows of an interrupted run.*--resume"):
        sample._main(argv(setup, out))  # never thrown away by a rerun without --resume
    sample.main(argv(setup, out, "flaky", "--resume"))
    assert out.read_bytes() == reference(setup)
    assert not partial_dir(out).exists()
    ref_record = (setup / "ref" / "data.decoding.json").read_bytes()
    assert (setup / "data.decoding.json").read_bytes() == ref_record


def test_a_full_disk_mid_write_then_resume(setup, monkeypatch, caplog):
    """A full disk while the third batch's rows are written leaves a cut last line: it is
    dropped on resume, and the result is the uninterrupted run's, byte for byte."""
    out = setup / "data.jsonl"
    real_append, calls = PartialRows.append, []

    def append(self, rows):
        calls.append(len(rows))
        if len(calls) == 3:
            self._f.write(D.io.row_line(rows[0]).encode()[:25])  # torn mid-line
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, rows)

    monkeypatch.setattr(PartialRows, "append", append)
    with pytest.raises(OSError, match="No space left"):
        sample.main(argv(setup, out))
    monkeypatch.setattr(PartialRows, "append", real_append)
    assert not out.exists()
    with pytest.raises(UsageError, match=r"--resume: the rows in .* were sampled with other "
                                         r"settings \(changed: job\)"):
        sample._main(argv(setup, out, "flaky", "--resume", "--n", "2"))
    with caplog.at_level(logging.WARNING):
        sample.main(argv(setup, out, "flaky", "--resume"))
    assert "dropped 25 bytes after the last complete row" in caplog.text
    assert out.read_bytes() == reference(setup)
    sample.main(argv(setup, out, "flaky", "--resume"))  # complete: nothing to do
    assert out.read_bytes() == reference(setup)


def test_a_failing_reward_keeps_the_rows_graded_before_it(setup, monkeypatch):
    """A reward function that raises on prompt 5 names itself and the prompt; the 4 prompts
    graded before it are kept, and --resume (the function fixed) grades only the rest."""
    out = setup / "data.jsonl"
    monkeypatch.setenv("DQO_TEST_FAIL_AT", "5")
    with pytest.raises(RewardError, match=r"prompts.jsonl: prompt 5: reward function "
                                          r".*rewards.py:flaky failed.*ValueError: grader broke"):
        sample.main(argv(setup, out))
    assert len((partial_dir(out) / "rows.jsonl").read_text().splitlines()) == 12
    monkeypatch.delenv("DQO_TEST_FAIL_AT")
    sample.main(argv(setup, out, "flaky", "--resume"))
    assert out.read_bytes() == reference(setup)


def test_a_reward_raising_system_exit_is_an_error_not_exit_0(setup):
    out = setup / "data.jsonl"
    with pytest.raises(RewardError, match=r"prompt 1: reward function .*:exits failed on row 0 "
                                          r".*SystemExit: 0"):
        sample.main(argv(setup, out, "exits"))
    assert not out.exists()


@pytest.mark.parametrize("prompt, got", [(None, "NoneType None"), (42, "int 42"), ("  ", "'  '")])
def test_null_numeric_and_empty_prompts_stop_before_sampling(setup, monkeypatch, prompt, got):
    rows = [dict(question=p.prompt, answer=p.answer) for p in arithmetic.make_problems(3, 1)]
    rows[2]["question"] = prompt
    D.write_jsonl(setup / "prompts.jsonl", rows)
    monkeypatch.setattr(sample, "load_sampler", lambda args: pytest.fail("model loaded"))
    with pytest.raises(DataError, match=rf"prompts.jsonl:3: prompt column 'question': expected "
                                        rf"a .*string or a list of .*, got {got}"):
        sample._main(argv(setup, setup / "data.jsonl"))


def test_train_refuses_to_evaluate_without_the_decoding_record(setup):
    """Data whose decoding record is gone (a full disk, a copy without it) is never evaluated
    with default settings: dqo.train asks for the record or the settings."""
    from dqo.train import parse_args

    out = setup / "data.jsonl"
    sample.main(argv(setup, out))
    run = ["--model", str(setup / "base"), "--data", str(out), "--eval-data",
           str(setup / "prompts.jsonl")]
    parse_args(run)  # with the record: fine
    (setup / "data.decoding.json").unlink()
    with pytest.raises(UsageError, match=r"no decoding record .*data.decoding.json.*give "
                                         r"--max-new-tokens, --temperature, --top-p, --top-k"):
        parse_args(run)
    with pytest.raises(UsageError, match=r"give --max-new-tokens$"):
        parse_args(run + ["--eval-samples", "0"])
    parse_args(run + ["--max-new-tokens", "8", "--temperature", "1", "--top-p", "1",
                      "--top-k", "0"])
    parse_args(run[:4])  # no evaluation: nothing decoded


def test_each_sample_draws_from_its_own_generator(tok, policy):
    """Prompt 1's samples are the same whether it is sampled alone or between other prompts,
    in batches that split it differently: the draws are the (seed, prompt, sample)'s."""
    probs = [p.prompt for p in arithmetic.make_problems(3, 2)]
    d = DecodingConfig(max_new_tokens=10, top_k=0, top_p=1.0)
    together = generate(policy, tok, probs, n=3, decoding=d, seeds=[11, 12, 13], batch_size=4)
    alone = generate(policy, tok, probs[1:2], n=3, decoding=d, seeds=[12], batch_size=3)
    assert [s.ids for s in together[1]] == [s.ids for s in alone[0]]
    torch.manual_seed(0)  # the global generator plays no part
    again = generate(policy, tok, probs[1:2], n=3, decoding=d, seeds=[12], batch_size=1)
    assert [s.ids for s in again[0]] == [s.ids for s in alone[0]]
    other = generate(policy, tok, probs[1:2], n=3, decoding=d, seeds=[99], batch_size=3)
    assert [s.ids for s in other[0]] != [s.ids for s in alone[0]]


def test_the_row_sampler_draws_from_transformers_distribution():
    """Temperature, top-k and top-p as transformers applies them; the drawn tokens' frequencies
    are their probabilities (4000 draws, fixed seeds: no flakiness)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]]).repeat(4000, 1)
    d = DecodingConfig(temperature=0.7, top_k=4, top_p=0.9, stop_ids=[0])
    u = uniforms(range(4000), 1)
    picked = RowSampler(d, u, width=0)(torch.zeros(4000, 0, dtype=torch.long), logits)
    assert torch.isfinite(picked).sum(1).eq(1).all()  # exactly one token left a row
    freq = torch.bincount(picked.argmax(1), minlength=6).float() / 4000
    want = logits[:1]
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(4), TopPLogitsWarper(0.9)):
        want = w(None, want)
    want = torch.softmax(want, -1)[0]
    assert freq[want == 0].sum() == 0
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)


class SeededSampler:
    """A stand-in engine (vLLM's interface): each prompt's samples from its seed alone."""

    def __init__(self):
        self.calls = []

    def generate(self, tokenizer, prompts, *, decoding, n=1, greedy=False, prefixes=None,
                 seeds=None):
        from dqo.generation import Sample
        self.calls.append(len(prompts))
        out = []
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            out.append([Sample(str(d), [int(d), 2], [-0.5, -0.25], True)
                        for d in torch.randint(3, 9, (n,), generator=g).tolist()])
        return out


def test_a_sampler_engine_resumes_by_whole_prompts(tok, tmp_path, monkeypatch):
    """An engine that generates itself (vLLM) gets whole prompts (batch size // n of them) and
    a seed for each; a run stopped after two of its calls resumes to the same bytes."""
    from dqo.generation.dataset import SampleJob, sample_dataset
    from dqo.rewards import task_reward

    rows = [dict(prompt=p.prompt, answer=p.answer) for p in arithmetic.make_problems(5, 4)]
    prompts = [r["prompt"] for r in rows]
    d = DecodingConfig(max_new_tokens=4, stop_ids=[2])

    def run(out, **kw):
        engine = SeededSampler()
        job = SampleJob(out=str(out), n=2, batch_size=4, seed=1, source="p.jsonl")
        sample_dataset(engine, tok, rows, prompts, task_reward("arithmetic"), d, job, **kw)
        return engine.calls

    assert run(tmp_path / "ref.jsonl") == [2, 2, 1]
    real_append = PartialRows.append

    def append(self, new_rows):
        if self.n_rows == 8:
            raise KeyboardInterrupt
        real_append(self, new_rows)

    monkeypatch.setattr(PartialRows, "append", append)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "data.jsonl")
    monkeypatch.setattr(PartialRows, "append", real_append)
    assert run(tmp_path / "data.jsonl", resume=True) == [1]  # the last prompt only
    assert (tmp_path / "data.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
