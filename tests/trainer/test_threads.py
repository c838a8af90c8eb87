"""dqo.threads: the run's CPU thread count is fixed at its start from the cores the process may
use, never from the machine's load, and a --resume restores it; --adapt-threads (opt-in) fits
it to the cores other processes leave free."""
import pytest
import torch

from dqo import threads


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    threads._fitter = None


def fake_clock(monkeypatch, readings):
    """Each sample returns the next (monotonic s, machine busy s, own CPU s)."""
    it = iter(readings)
    state = {}

    def sample(self):
        state["now"] = next(it)
        return state["now"]
    monkeypatch.setattr(threads.ThreadFitter, "_sample", sample)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)


@pytest.mark.parametrize("others,cores,max_threads,expected", [
    (0.0, 2, 2, 2),    # quiet machine: every core
    (1.0, 2, 2, 1),    # one busy process beside us on 2 cores
    (1.9, 2, 2, 1),    # never fewer than one
    (0.6, 4, 4, 3),
    (0.0, 8, 4, 4),    # never more than the run started with
])
def test_fitter_uses_the_free_cores(monkeypatch, restore_threads, others, cores, max_threads,
                                    expected):
    # over 10 s, we used 7 CPU-s and the machine was busy 7 + 10 * others CPU-s
    fake_clock(monkeypatch, [(0.0, 100.0, 5.0), (10.0, 107.0 + 10 * others, 12.0)])
    f = threads.ThreadFitter(max_threads=max_threads, cores=cores)
    f.start()
    assert torch.get_num_threads() == expected


def test_fitter_looks_again_only_every_interval(monkeypatch, restore_threads):
    fake_clock(monkeypatch, [(0.0, 0.0, 0.0), (1.0, 2.0, 1.0),  # start: 1 core busy elsewhere
                             (10.0, 11.0, 10.0)])              # then quiet again
    f = threads.ThreadFitter(max_threads=2, cores=2)
    f.start()
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(threads.time, "monotonic", lambda: 1.0 + threads.INTERVAL_S / 2)
    f.adapt()  # too early: takes no sample (one more would consume the quiet reading)
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(threads.time, "monotonic", lambda: 10.0)
    f.adapt()
    assert torch.get_num_threads() == 2


def test_explicit_count_is_kept(restore_threads):
    threads.fit_threads(1)
    assert torch.get_num_threads() == 1 and threads._fitter is None
    threads.adapt()  # a no-op without a fitter
    assert torch.get_num_threads() == 1


def test_real_machine_sample_is_sane(restore_threads):
    """On Linux the real /proc/stat reading works and gives a count in range."""
    busy = threads._machine_busy_s()
    if busy is None:
        pytest.skip("no /proc/stat")
    n = torch.get_num_threads()
    f = threads.ThreadFitter(max_threads=n, cores=n)
    f.start()
    assert 1 <= torch.get_num_threads() <= n


def test_train_cli_takes_threads():
    from dqo.cli import UsageError
    from dqo.train import parse_args
    assert parse_args(["--threads", "1"]).threads == 1
    assert parse_args([]).threads == 0
    with pytest.raises(UsageError, match="--threads"):
        parse_args(["--threads", "-1"])


def busy_machine(monkeypatch, cores=2):
    """/proc/stat says every core is busy with other processes; the process may use ``cores``."""
    monkeypatch.setattr(threads, "_machine_busy_s", lambda: threads.time.monotonic() * 8)
    monkeypatch.setattr(threads, "_own_s", lambda: 0.0)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    monkeypatch.setattr(threads.torch.cuda, "is_available", lambda: False)


def test_the_thread_count_does_not_follow_the_load(monkeypatch, restore_threads):
    """What made a kill + --resume differ in 36 tensors: the count fitted to the load."""
    busy_machine(monkeypatch, cores=2)
    torch.set_num_threads(1)
    assert threads.fit_threads(0) == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(threads.time, "monotonic", lambda: 1e9)  # long after, still busy
    threads.adapt()
    assert torch.get_num_threads() == 2 and threads.run_threads() == 2


def test_adapting_to_the_load_is_opt_in(monkeypatch, restore_threads):
    busy_machine(monkeypatch, cores=2)
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    ticks = iter(range(0, 1000, 10))
    monkeypatch.setattr(threads.time, "monotonic", lambda: float(next(ticks)))
    assert threads.fit_threads(0, adaptive=True) == 2  # the run's count, as recorded
    assert torch.get_num_threads() == 1  # then fitted to the (simulated) busy machine
    assert threads.run_threads() == 2  # what its checkpoints record


def test_a_resume_restores_the_recorded_count(monkeypatch, restore_threads, caplog):
    busy_machine(monkeypatch, cores=2)
    assert threads.fit_threads(0, recorded=1) == 1 and torch.get_num_threads() == 1
    assert "resumed with the run's 1 threads; this process may use 2 cores" in caplog.text
    caplog.clear()
    assert threads.fit_threads(2, recorded=1) == 2  # --threads N still wins, with a warning
    assert "--threads 2, but the run used 1 threads" in caplog.text


def test_the_command_line_records_and_restores_the_count(tmp_path, monkeypatch,
                                                          restore_threads):
    import json

    from dqo import train as train_cli
    busy_machine(monkeypatch, cores=2)
    monkeypatch.setattr(train_cli, "run_default", lambda args: {"before": {}, "after": {}})
    out = tmp_path / "o"
    train_cli.main(["--out", str(out), "--threads", "1", "--no-progress"])
    assert json.loads((out / "run.json").read_text())["threads"] == 1
    torch.set_num_threads(2)
    train_cli.main(["--out", str(out), "--resume", "--no-progress"])  # --threads 0
    assert torch.get_num_threads() == 1
