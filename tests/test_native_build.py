"""A killed JIT build of the native ops never wedges the processes after it (issue 15).

torch's build leaves ``<build_dir>/lock`` behind when its process is killed, and waits on such
a lock forever. The first tests fake the leftovers; the last kills a real build mid-way.
"""
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dqo_kernels import native

ROOT = Path(__file__).resolve().parent.parent
# Deadline of each build process: a wedged build waits for ever, an honest one takes torch's
# import and a tiny compile, seconds on a quiet machine but minutes on a busy or throttled one
# (seen here: `import torch` alone took 170 s), where a failure would only say "slow".
BUILD_TIMEOUT_S = float(os.environ.get("DQO_TEST_BUILD_TIMEOUT_S", "1500"))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_leftovers(build_dir: Path, owner) -> Path:
    lock = build_dir / "lock"
    lock.touch()
    if owner is not None:
        (build_dir / native.OWNER_FILE).write_text(json.dumps(owner))
    return lock


def test_lock_of_a_dead_builder_is_removed_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    lock = _fake_leftovers(tmp_path, {"pid": pid, "host": "here", "started": time.time() - 5})
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        with native._build_guard(tmp_path):
            assert not lock.exists()
            # while we build, our own record is there for the next process to read
            assert json.loads((tmp_path / native.OWNER_FILE).read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 5
    assert (tmp_path / native.OWNER_FILE).read_text() == ""  # a clean end clears the record
    msg = caplog.text
    assert "stale build lock" in msg and str(lock) in msg and f"process {pid}" in msg


def test_clean_state_builds_without_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        with native._build_guard(tmp_path):
            pass
        with native._build_guard(tmp_path):  # the owner file of the first stays, cleared
            pass
    assert caplog.text == ""


def test_old_lock_without_owner_is_stale_a_young_one_is_waited_for(tmp_path, caplog,
                                                                  monkeypatch):
    lock = _fake_leftovers(tmp_path, None)
    monkeypatch.setattr(native, "WAIT_REPORT_S", 0.3)
    monkeypatch.setattr(native, "STALE_AGE_S", 1.5)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        with native._build_guard(tmp_path):
            assert not lock.exists()
    waited = time.monotonic() - t0
    assert 1.0 < waited < 10, waited  # not removed at once: it could be a live foreign build
    assert "no owner record" in caplog.text and "stale build lock" in caplog.text


_HOLDER = textwrap.dedent("""
    import fcntl, json, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": "h", "started": time.time()}).encode())
    open(sys.argv[2], "w").close()  # the torch lock, as a live builder has it
    print("locked", flush=True)
    sys.stdin.readline()  # builds until the test says
    os.kill(os.getpid(), 9)  # dies mid-build: record and lock stay, the flock goes
""")


def test_waits_for_a_live_builder_and_says_so_then_takes_over_when_it_dies(
        tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(native, "WAIT_REPORT_S", 0.3)
    lock = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / native.OWNER_FILE),
                               str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def kill_holder_once_the_wait_is_reported():
        # the holder lives until the waiting process has said what it waits for, however
        # slow the machine; a guard that never says it fails the test at the deadline
        deadline = time.monotonic() + 120
        while "still waiting" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        holder.stdin.write("die\n")
        holder.stdin.flush()

    try:
        assert holder.stdout.readline().strip() == "locked"
        killer = threading.Thread(target=kill_holder_once_the_wait_is_reported, daemon=True)
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            killer.start()
            with native._build_guard(tmp_path):
                assert not lock.exists()
        killer.join(10)
    finally:
        holder.kill()
        holder.wait()
    text = caplog.text
    assert f"for process {holder.pid} on h" in text and "still waiting" in text
    assert str(lock) in text
    assert "stale build lock" in text and "died while building" in text


def test_a_dead_builders_compilers_are_killed_and_nothing_else(tmp_path):
    # stand-ins for the ninja/c++ that a builder killed with SIGKILL leaves running
    env = {**os.environ, native.BUILDER_ENV: "tok"}
    orphan = subprocess.Popen(["sleep", "60"], cwd=tmp_path, env=env)
    elsewhere = subprocess.Popen(["sleep", "60"], env=env)  # same token, not in the build dir
    other_build = subprocess.Popen(["sleep", "60"], cwd=tmp_path,
                                   env={**os.environ, native.BUILDER_ENV: "other"})
    try:
        assert native._processes_of("tok", tmp_path) == [(orphan.pid, "sleep")]
        _fake_leftovers(tmp_path, {"pid": _dead_pid(), "host": "h", "started": 0, "token": "tok"})
        with native._build_guard(tmp_path):
            assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert elsewhere.poll() is None and other_build.poll() is None
    finally:
        for p in (orphan, elsewhere, other_build):
            p.kill()
            p.wait()


def test_flock_is_per_open_file_so_two_builders_exclude_each_other(tmp_path):
    # the guard relies on this: two processes (or two opens) cannot both hold the owner file
    path = tmp_path / native.OWNER_FILE
    a, b = os.open(path, os.O_RDWR | os.O_CREAT), os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(a)
        os.close(b)


# --- the real thing: torch's build killed mid-compile, then one that must finish -------------
#
# Both build a stand-in for csrc/ that compiles in a blink, so that the test costs two process
# starts, not two compiles of the real ops (minutes on a busy machine; the ops themselves are
# tested everywhere else). The first build's compiler reads a header that is a FIFO nobody
# writes to, so it is mid-compile for as long as the test likes: the kill never races the end
# of the compile.

_BUILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dqo_kernels import native
    src = Path(sys.argv[1])
    native._source_dir = lambda: src
    native.SOURCES, native.INCLUDED = ("module.cpp",), tuple(sys.argv[2:])
    print("building", file=sys.stderr, flush=True)  # a timeout says how far it got
    native.load_extension()
    print("OK", native.library_path())
""")


def test_a_build_killed_mid_way_does_not_wedge_the_next_one(tmp_path):
    ext_dir, src = tmp_path / "ext", tmp_path / "src"
    src.mkdir()
    (src / "module.cpp").write_text('#include "stall.h"\nint dqo_test_stand_in() { return 1; }\n')
    os.mkfifo(src / "stall.h")  # the first compiler blocks reading it
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), "DQO_KERNELS_FORCE_JIT": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    lock = ext_dir / native.JIT_NAME / "lock"
    # (stall.h is not hashed into the flags here: reading the FIFO would block the builder)
    first = subprocess.Popen([sys.executable, "-c", _BUILD, str(src)], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while not (lock.exists() and {"cc1plus", "clang", "clang++"} & set(_names_in(lock.parent))):
            assert first.poll() is None, f"the first build ended (rc {first.returncode}) early"
            assert time.monotonic() < deadline, "the first build never started compiling"
            time.sleep(0.1)
        # SIGKILL to the builder alone, as the OOM killer does: its compilers live on, orphaned
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert lock.exists()  # the leftover that used to wedge every later process
        (src / "stall.h").unlink()
        (src / "stall.h").write_text("// now a plain header\n")

        out = _run_with_deadline([sys.executable, "-c", _BUILD, str(src), "stall.h"], env,
                                 BUILD_TIMEOUT_S)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "OK" in out.stdout and str(ext_dir) in out.stdout
        assert "removed the stale build lock" in out.stderr and str(lock) in out.stderr
        assert "killing the processes that the build of process" in out.stderr  # its compiler
        assert not lock.exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        _kill_processes_in(ext_dir)  # compilers of a build that failed the test, if any


def _names_in(directory: Path):
    """Names of the processes working in ``directory``."""
    names = []
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(directory):
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            continue
    return names


def _kill_processes_in(directory: Path) -> None:
    """SIGKILL what runs in ``directory`` or below (this test's builds only)."""
    prefix = os.path.realpath(directory) + os.sep
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if (os.readlink(f"/proc/{pid}/cwd") + os.sep).startswith(prefix):
                os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def _run_with_deadline(cmd, env, timeout):
    """subprocess.run, but a wedged child fails the test instead of hanging it."""
    try:
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)  # kills the child when it runs out
    except subprocess.TimeoutExpired as exc:
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) \
            else (exc.stderr or "")
        pytest.fail(f"the second build did not finish in {timeout:.0f} s (wedged, or a busy "
                    f"machine: see DQO_TEST_BUILD_TIMEOUT_S):\n{err[-3000:]}")
