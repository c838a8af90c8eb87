"""A run directory owned by one run (issue 27 A): a rerun into the same --out neither deletes
its own checkpoints nor mixes with the old run, a second process is refused, --resume refuses
options it cannot honour, and rotation deletes only the saving run's own checkpoints."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_reliability import args_for, examples

from dqo import rundir
from dqo import train as train_cli
from dqo.checkpoint import latest_checkpoint, save_checkpoint
from dqo.configs import TrainConfig
from dqo.engine import OptimConfig, TorchEngine
from dqo.errors import CheckpointError, UsageError
from dqo.loop import train
from dqo.modeling import ValueModel

ROOT = Path(__file__).resolve().parents[2]


def steps(root: Path):
    return sorted(p.name for p in root.glob("step-*"))


# ---- rotation ----------------------------------------------------------------------------------


def test_a_second_run_keeps_its_own_checkpoints_and_the_first_runs(policy, tmp_path):
    """The README's command twice into one --out: the first run's steps sort after the second's;
    rotation by name deleted each checkpoint of the second run right after saving it."""
    engines = {"policy": TorchEngine(policy, OptimConfig())}
    root = tmp_path / "checkpoints"
    for step in (40, 48):
        save_checkpoint(tmp_path, step, engines, {"run_id": "first"}, keep=2)
    for step in (8, 16, 24):
        saved = save_checkpoint(tmp_path, step, engines, {"run_id": "second"}, keep=2)
        assert saved.is_dir() and latest_checkpoint(tmp_path) == saved
    assert steps(root) == ["step-0000016", "step-0000024", "step-0000040", "step-0000048"]


def test_a_resume_from_an_older_checkpoint_keeps_what_it_saves(policy, tmp_path):
    """Resumed from step 2 of 2..10 (latest pointed back), saving step 4 with --keep-checkpoints
    2: the checkpoints of later steps are not older, and the one just saved stays."""
    engines = {"policy": TorchEngine(policy, OptimConfig())}
    for step in (2, 4, 6, 8, 10):
        save_checkpoint(tmp_path, step, engines, {"run_id": "r"}, keep=5)
    saved = save_checkpoint(tmp_path, 4, engines, {"run_id": "r"}, keep=2)
    assert latest_checkpoint(tmp_path) == saved
    assert steps(tmp_path / "checkpoints") == [f"step-{s:07d}" for s in (2, 4, 6, 8, 10)]
    save_checkpoint(tmp_path, 6, engines, {"run_id": "r"}, keep=2)
    assert steps(tmp_path / "checkpoints") == [f"step-{s:07d}" for s in (4, 6, 8, 10)]


def test_checkpoints_carry_the_run_id_and_threads_and_a_resume_keeps_the_id(tok, policy,
                                                                             tmp_path):
    exs = examples(tok, policy)
    value = ValueModel.from_policy(policy)
    train(args_for(tmp_path, max_steps=1), tok, policy, value, exs)
    out = tmp_path / "run"
    first = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert first["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
    assert first["threads"] == torch.get_num_threads()
    train(args_for(tmp_path, max_steps=2, resume=True, resume_force=True), tok, policy, value,
          exs)
    second = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert second["step"] == 2 and second["run_id"] == first["run_id"]


# ---- a new run into a used directory; --resume's checks ---------------------------------------


def stub_cli(monkeypatch, calls=None):
    """``python -m dqo.train`` without the work (tested elsewhere): what claims the directory,
    writes config.yaml and fixes the threads runs for real."""
    def stub(args):
        if calls is not None:
            calls.append(args)
        return {"before": {}, "after": {}}
    monkeypatch.setattr(train_cli, "run_custom", stub)
    monkeypatch.setattr(train_cli, "run_default", stub)


def cli(argv, capsys):
    """(exit code, stderr) of ``python -m dqo.train argv``."""
    try:
        train_cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_a_rerun_into_the_same_out_is_refused_unless_overwrite(tmp_path, monkeypatch, capsys,
                                                               caplog, restore_threads):
    stub_cli(monkeypatch)
    out = tmp_path / "default"
    argv = ["--out", str(out), "--no-progress", "--threads", "1"]
    assert cli(argv, capsys)[0] == 0
    (out / "checkpoints" / "step-0000032").mkdir(parents=True)  # what the first run left
    code, err = cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {out} holds another run" in err and "--overwrite" in err
    assert (out / ".lock").read_text() == ""  # a refused run leaves no stale lock behind
    assert (out / "checkpoints" / "step-0000032").is_dir()  # untouched
    assert cli([*argv, "--overwrite"], capsys)[0] == 0
    assert not (out / "checkpoints").exists()
    assert "--overwrite: removed the previous run's run.json, checkpoints" in caplog.text
    assert cli([*argv, "--resume"], capsys)[0] == 0
    # config.yaml, which --config reads back into another --out, neither resumes nor overwrites
    again = train_cli.parse_args(["--config", str(out / "config.yaml")])
    assert not (again.resume or again.overwrite or again.resume_force)


@pytest.mark.parametrize("flag,first,now,diff", [
    ("--lr", "5e-7", "2.5e-5", "--lr: config.yaml 5e-07, now 2.5e-05"),
    ("--batch-size", "64", "32", "--batch-size: config.yaml 64, now 32"),
    ("--seed", "0", "1", "--seed: config.yaml 0, now 1"),
])
def test_resume_with_changed_options_is_refused_with_a_one_line_diff(
        tmp_path, monkeypatch, capsys, restore_threads, flag, first, now, diff):
    calls = []
    stub_cli(monkeypatch, calls)
    argv = ["--out", str(tmp_path / "o"), "--no-progress", "--threads", "1", "--micro-batch",
            "16"]
    assert cli([*argv, flag, first], capsys)[0] == 0
    code, err = cli([*argv, "--resume", flag, now], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert diff in err and "--resume-force" in err
    assert len(calls) == 1  # refused before any work
    # what does not change the run may change; --resume-force takes the rest
    assert cli([*argv, "--resume", flag, first, "--eval-every", "5", "--save-every", "3"],
               capsys)[0] == 0
    assert cli([*argv, "--resume", flag, now, "--resume-force"], capsys)[0] == 0


def test_resume_compares_with_the_checkpoints_options(tok, policy, tmp_path):
    exs = examples(tok, policy)
    train(args_for(tmp_path, max_steps=1), tok, policy, ValueModel.from_policy(policy), exs)
    with pytest.raises(UsageError, match=r"\(--max-steps: checkpoint 1, now 2; --lr: "
                                         r"checkpoint 0.001, now 0.05\)"):
        with rundir.claim(args_for(tmp_path, max_steps=2, lr=0.05, resume=True)):
            pass
    with rundir.claim(args_for(tmp_path, max_steps=1, keep_checkpoints=5, resume=True)):
        pass


def test_resume_into_a_directory_without_a_run_is_an_error(tmp_path, monkeypatch, capsys):
    stub_cli(monkeypatch)
    code, err = cli(["--out", str(tmp_path / "typo"), "--resume", "--no-progress"], capsys)
    assert code == 2
    assert f"--resume: {tmp_path / 'typo'} holds no checkpoint and no run to resume" in err
    assert not (tmp_path / "typo").exists()
    with pytest.raises(CheckpointError, match="no run to resume"):
        with rundir.claim(TrainConfig(out=str(tmp_path / "empty"), resume=True)):
            pass


def test_overwrite_and_resume_exclude_each_other():
    with pytest.raises(UsageError, match="--overwrite: .* give one"):
        TrainConfig(overwrite=True, resume=True)
    with pytest.raises(UsageError, match="--resume-force: only with --resume"):
        TrainConfig(resume_force=True)


def test_out_naming_a_file_is_refused_before_any_work(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("x")
    with pytest.raises(UsageError, match=rf"--out: expected a run directory, got the file {f}"):
        train_cli.parse_args(["--out", str(f)])


# ---- one process at a time ---------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from dqo import rundir
    from dqo.configs import TrainConfig
    with rundir.claim(TrainConfig(out=sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_ones_lock_taken_over(
        tmp_path, caplog):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UsageError) as e:
            with rundir.claim(TrainConfig(out=str(out), resume=True)):
                pass
        assert str(e.value) == (f"--out {out}: in use by another run (pid {proc.pid} on host "
                                f"{socket.gethostname()}); wait for it to end, or choose "
                                f"another --out")
    finally:
        proc.kill()  # SIGKILL: its lock file still names it
        proc.wait()
    with rundir.claim(TrainConfig(out=str(out), resume=True)):
        assert (out / ".lock").read_text().split()[0] == str(os.getpid())
    assert f"took over the lock of pid {proc.pid} on host" in caplog.text
    assert (out / ".lock").read_text() == ""  # released: the next run takes it silently


def test_claim_is_reentrant_within_a_process(tmp_path):
    args = TrainConfig(out=str(tmp_path / "o"))
    with rundir.claim(args) as outer:
        with rundir.claim(args) as inner:  # the loop inside the command line's claim
            assert inner is outer
        assert (tmp_path / "o" / ".lock").read_text().startswith(str(os.getpid()))


# ---- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_is_one_line_exit_130_and_the_checkpoints_stay_whole(tok, policy, tmp_path,
                                                                    monkeypatch):
    exs = examples(tok, policy)
    value = ValueModel.from_policy(policy)
    calls = {"n": 0}
    real = TorchEngine.save_checkpoint

    def interrupted_mid_save(self, path):
        calls["n"] += 1
        if calls["n"] == 3:  # step 2's policy is written, its value is not
            raise KeyboardInterrupt
        real(self, path)
    monkeypatch.setattr(TorchEngine, "save_checkpoint", interrupted_mid_save)
    with pytest.raises(KeyboardInterrupt):
        train(args_for(tmp_path, max_steps=2), tok, policy, value, exs)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released


def test_sigint_at_the_command_line(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "dqo.train", "--out", str(out), "--threads",
                             "1", "--no-progress"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stderr:
        if "stage 1/4" in line:
            break
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "python -m dqo.train: interrupted; the checkpoints written so far are intact; --resume "
        "continues")
