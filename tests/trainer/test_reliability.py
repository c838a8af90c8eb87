"""Faults a long run meets (issue 15): cut metrics lines, a `latest` naming a missing step, a
full disk mid-save, non-finite gradients, bad rows, and command lines given wrong values."""
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_loop import train_args

from dqo import data as D
from dqo.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from dqo.cli import UsageError
from dqo.configs import TrainConfig
from dqo.engine import OptimConfig, TorchEngine
from dqo.errors import TrainingError
from dqo.loop import train, trim_metrics
from dqo.modeling import PolicyLogprobs, ValueModel
from dqo.reference_logps import compute_ref_logps
from dqo.runs import check_bad_rows
from dqo.tasks import arithmetic
from dqo.train import parse_args

ROOT = Path(__file__).resolve().parents[2]


def examples(tok, policy, n=16):
    rows = []
    for i, p in enumerate(arithmetic.make_problems(n, 7)):
        rows.append(dict(prompt=p.prompt, response=p.solution if i % 2 else "#### 1",
                         reward=float(i % 2)))
    exs = [D.tokenize_row(D.check_row(r, "x"), tok) for r in rows]
    compute_ref_logps(policy, exs, tok.pad_token_id)
    return exs


def args_for(tmp_path, **kw):
    """test_loop's arguments, saving every step."""
    return train_args(tmp_path, **{"save_every": 1, "max_steps": 2, **kw})


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- metrics, checkpoints, final ---------------------------------------------------------------


def test_a_cut_last_metrics_line_is_repaired(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
    assert "dropped a cut last line" in caplog.text
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')  # damage before the end: not a kill
    with pytest.raises(TrainingError, match=r"metrics.jsonl:2: not a JSON row"):
        trim_metrics(path, 2)


def test_resume_after_a_kill_mid_metrics_write(tok, policy, tmp_path):
    exs = examples(tok, policy)
    value = ValueModel.from_policy(policy)
    train(args_for(tmp_path, max_steps=1), tok, policy, value, exs)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.')  # killed here, mid-write
    train(args_for(tmp_path, resume=True), tok, policy, value, exs)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2]


def test_latest_naming_a_missing_step_is_an_error_naming_both(tok, policy, tmp_path):
    exs = examples(tok, policy)
    train(args_for(tmp_path), tok, policy, ValueModel.from_policy(policy), exs)
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step-0000009")
    with pytest.raises(CheckpointError, match=rf"{root / 'latest'} names "
                                              rf"{root / 'step-0000009'}, which is missing"):
        latest_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError):  # never a silent restart at step 0
        train(args_for(tmp_path, resume=True), tok, policy, ValueModel.from_policy(policy), exs)


def test_final_is_replaced_whole_or_not_at_all(tok, policy, tmp_path, monkeypatch):
    exs = examples(tok, policy)
    value = ValueModel.from_policy(policy)
    train(args_for(tmp_path, max_steps=1), tok, policy, value, exs)
    final = tmp_path / "run" / "final"
    before = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert (final / "policy" / "config.json").is_file() and (final / "value").is_dir()

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", fail)  # after both models were written
    with pytest.raises(OSError, match="No space left"):
        train(args_for(tmp_path, max_steps=2, resume=True), tok, policy, value, exs)
    after = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert after == before  # the previous final/, whole


def test_a_full_disk_during_a_save_raises_and_keeps_the_last_checkpoint(policy, tmp_path):
    engines = {"policy": TorchEngine(policy, OptimConfig())}
    first = save_checkpoint(tmp_path, 1, engines, {"args": {}})
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    saved = weights(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    try:  # a file may not grow past a tenth of a checkpoint: the disk is "full"
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 10, hard))
        with pytest.raises((OSError, RuntimeError)):  # torch.save's writer raises the latter
            save_checkpoint(tmp_path, 2, engines, {"args": {}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]  # no temp left
    assert latest_checkpoint(tmp_path) == first
    load_checkpoint(first, engines)
    for k, v in policy.state_dict().items():
        assert torch.equal(v, saved[k]), k


# ---- non-finite gradients ----------------------------------------------------------------------


def poison(policy, steps):
    """NaN hidden states in the policy's forward on the given training steps (1-based, two
    micro-batches a step)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if (calls["n"] + 1) // 2 in steps:
            output.last_hidden_state.mul_(float("nan"))
        return output

    return policy.model.register_forward_hook(hook)


def test_a_non_finite_step_is_skipped_and_recorded(tok, policy, tmp_path):
    exs = examples(tok, policy)
    value = ValueModel.from_policy(policy)  # before the hook: a deep copy would carry it
    handle = poison(policy, {2})
    saved = {}

    class Spy(TorchEngine):
        def step(self):
            if self.micro_steps == 2 and isinstance(self.module, PolicyLogprobs):
                saved.update(weights(self.module.model))  # after step 1: step 2 changes none
            super().step()

    import dqo.loop as T
    real = T.make_engine
    T.make_engine = lambda model, cfg, kind, **deepspeed_options: Spy(model, cfg)
    try:
        train(args_for(tmp_path, max_steps=2, save_every=0), tok, policy, value, exs)
    finally:
        T.make_engine = real
        handle.remove()
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [False, True]
    assert rows[1]["loss"] != rows[1]["loss"]  # NaN
    assert saved and all(torch.equal(v, saved[k]) for k, v in policy.state_dict().items())


def test_consecutive_non_finite_steps_stop_the_run_with_the_checkpoint_intact(tok, policy,
                                                                               tmp_path):
    exs = examples(tok, policy, n=32)
    value = ValueModel.from_policy(policy)
    handle = poison(policy, {2, 3, 4})
    try:
        with pytest.raises(TrainingError, match=r"3 consecutive steps \(up to step 4\) had "
                                                r"non-finite gradients.*step-0000003"):
            train(args_for(tmp_path, max_steps=4, save_every=1, keep_checkpoints=5), tok, policy,
                  value, exs)
    finally:
        handle.remove()
    root = tmp_path / "run" / "checkpoints"
    # steps 2-3 were saved too (their weights are step 1's); step 4 stopped before its save
    assert latest_checkpoint(tmp_path / "run") == root / "step-0000003"


# ---- bad rows ----------------------------------------------------------------------------------


def test_bad_rows_are_reported_and_skipped(tok, tmp_path, caplog):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "Q: 1+1=?\n", "response": "#### 2", "reward": 1})
    with open(p, "wb") as f:
        f.write(good.encode() + b"\n")
        f.write(b'{"prompt": "Q\xff\xfe", "response": "x", "reward": 0}\n')  # not UTF-8
        f.write(json.dumps({"prompt": "Q", "response": "1", "reward": 0,
                            "response_ids": [3, 99999]}).encode() + b"\n")
        f.write(json.dumps({"prompt": "Q", "response": "hello", "reward": 0}).encode() + b"\n")
        f.write(json.dumps({"prompt": "Q: 1+1=?\n", "response": "1+1=2\n" * 5000 + "#### 2",
                            "reward": 1}).encode() + b"\n")  # huge
    rows, errors = D.read_jsonl(p)
    assert len(rows) == 4 and len(errors) == 1
    assert errors[0].startswith(f"{p}:2: not UTF-8")
    exs, bad = D.tokenize_rows(rows, tok, max_length=64)
    assert [e.source for e in exs] == [f"{p}:1", f"{p}:5"]
    assert bad[0].startswith(f"{p}:3: 'response_ids' holds 99999, outside the tokenizer's "
                             f"vocabulary of {len(tok)}")
    assert bad[1].startswith(f"{p}:4: the tokenizer failed on the response")
    huge = exs[1]
    assert len(huge) == 64 and not huge.finished and huge.cut_to_fit  # cut, never an OOM
    with pytest.raises(D.DataError, match=rf"{p}:2: not UTF-8"):
        D.read_jsonl(p, strict=True)


def test_a_mostly_bad_dataset_stops_the_run(tmp_path):
    args = TrainConfig(data=str(tmp_path / "d.jsonl"))
    check_bad_rows(args, ["x:1: bad"], 10)  # 10%: allowed, with a warning
    with pytest.raises(UsageError, match=r"2 of 10 rows of .*d.jsonl are bad and were skipped, "
                                         r"more than --max-bad-rows 0.1 allows \(the first: x:1"):
        check_bad_rows(args, ["x:1: bad", "x:2: bad"], 10)
    check_bad_rows(TrainConfig(data="d", max_bad_rows=0.5), ["a", "b"], 10)


# ---- command lines -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--lam", "2"], "--lam: expected a value in [0, 1], got 2.0"),
    (["--beta", "inf"], "--beta: expected a value in (0, inf), got inf"),
    (["--batch-size", "6", "--micro-batch", "4"],
     "--batch-size: expected a multiple of --micro-batch (4), got 6"),
    (["--model", "/no/such/model", "--data", "pyproject.toml"],
     "--model: no such model directory: /no/such/model"),
    (["--model", "org/name", "--data", "missing.jsonl"],
     "--data: no such file or directory: missing.jsonl"),
    (["--model", "org/name", "--data", "README.md"], "--data: expected a .jsonl, .json"),
    (["--data", "README.md"], "--data needs --model"),
])
def test_train_arguments_are_checked_before_any_work(argv, message):
    with pytest.raises(UsageError) as e:
        parse_args(argv)
    assert message in str(e.value)


def test_command_line_errors_are_one_line_exit_2_no_traceback(tok, policy, tmp_path):
    model = tmp_path / "base"
    policy.save_pretrained(model)
    tok.save_pretrained(model)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Q", "response": "1", "reward": 1}\n{"prompt": 3}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv, message in [
        (["dqo.train", "--lam", "2"], "python -m dqo.train: error: --lam: expected a value"),
        (["dqo.train", "--model", str(model), "--data", str(data), "--strict-data",
          "--engine", "torch", "--out", str(tmp_path / "o")],
         f"python -m dqo.train: error: {data}:2: missing required field 'reward'"),
        (["dqo.evaluate", "--model", str(tmp_path / "nope"), "--data", str(data), "--task",
          "arithmetic"], "python -m dqo.evaluate: error: --model: no such model directory"),
        (["dqo.sample", "--model", str(model), "--prompts", str(data), "--task", "arithmetic",
          "--out", str(tmp_path / "s.jsonl"), "--top-k", "-1"],
         "python -m dqo.sample: error: --top-k: expected an integer >= 0"),
    ]:
        res = subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 2, (argv, res.stderr[-2000:])
        assert message in res.stderr, (argv, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, (argv, res.stderr[-2000:])


class _Boom:
    def __reduce__(self):  # what a planted pickle does: call anything on load
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_in_a_checkpoint_never_runs(tmp_path, monkeypatch):
    """Every checkpoint file is loaded with weights_only=True: a planted pickle is refused with
    an error that names the file, and never called."""
    from dqo.atomic import safe_load
    from dqo.errors import CheckpointError
    path = tmp_path / "rng_state.pt"
    torch.save({"torch": torch.get_rng_state(), "python": _Boom()}, path)
    calls = []
    monkeypatch.setattr(os, "system", lambda cmd: calls.append(cmd))
    with pytest.raises(CheckpointError, match=r"rng_state.pt: not loadable as plain tensors"):
        safe_load(path)
    assert calls == []
    good = tmp_path / "ok.pt"
    torch.save({"torch": torch.get_rng_state(), "python": __import__("random").getstate()}, good)
    assert safe_load(good)["python"] == __import__("random").getstate()


def test_atomic_writes_get_the_umask_mode_of_a_plain_open(tmp_path):
    """mkstemp makes files 0600; a dataset or checkpoint is then unreadable by teammates."""
    from dqo.atomic import atomic_write
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda f: f.write("x"))
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "b.txt", lambda f: f.write("x"))
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
