"""dqo.threads: the run's CPU thread count follows the cores other processes leave free."""
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
