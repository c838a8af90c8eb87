"""The native library's build: atomic, never waits on another process, never silent, never
stale (issue 15: a build killed mid-way used to wedge every later process).

The builds here compile small stand-ins for csrc/ (no torch headers either way: a blink), and
the builder processes load _native/build.py by path, as setup.py does, so that they do not import
torch. The real library is built and tested by every other kernel test.
"""
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
import torch

from dqo_kernels import token_logprobs
from dqo_kernels._native import build as native
from dqo_kernels._native import load

ROOT = Path(__file__).resolve().parent.parent.parent
DEADLINE_S = float(os.environ.get("DQO_TEST_BUILD_TIMEOUT_S", "600"))  # a wedge fails, not hangs

STAND_IN = 'extern "C" int dqo_stand_in() { return 7; }\n'

_BUILDER = textwrap.dedent("""
    import importlib.util, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("native", sys.argv[1])
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    print("building", flush=True)
    native.build(Path(sys.argv[2]), "base", Path(sys.argv[3]))
    print("built", flush=True)
""")


def _stand_in(tmp_path: Path, text: str = STAND_IN) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "module.cpp").write_text(text)
    return src


def _builder(out: Path, src: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _BUILDER, native.__file__, str(out), str(src)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _compilers_of(src: Path):
    """pids of the processes compiling ``src``'s module.cpp (the compiler and its children)."""
    found, marker = [], str(src / "module.cpp").encode()
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def test_build_writes_the_library_atomically_and_it_loads(tmp_path):
    out = tmp_path / "cache" / "lib.so"
    native.build(out, "base", _stand_in(tmp_path))
    import ctypes
    assert ctypes.CDLL(str(out)).dqo_stand_in() == 7
    assert sorted(p.name for p in out.parent.iterdir()) == ["lib.so"]  # no temporary left


def test_a_build_killed_mid_compile_wedges_nothing(tmp_path):
    """SIGKILL to a builder while its compiler runs (as the OOM killer or a Ctrl-C during the
    first build does): no library appears, and the next build finishes at once."""
    src = _stand_in(tmp_path, '#include "stall.h"\n' + STAND_IN)
    os.mkfifo(src / "stall.h")  # the compiler blocks reading it: mid-compile for as long as we like
    out = tmp_path / "cache" / "lib.so"
    first = _builder(out, src)
    try:
        assert first.stdout.readline().strip() == "building"
        deadline = time.monotonic() + DEADLINE_S
        while not _compilers_of(src):  # its compiler has started
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)  # the builder alone; its compiler lives on, blocked
        first.wait()
        assert not out.exists()
        (src / "stall.h").unlink()
        (src / "stall.h").write_text("// a plain header now\n")
        second = _builder(out, src)
        stdout, stderr = second.communicate(timeout=DEADLINE_S)
        assert second.returncode == 0 and "built" in stdout, stderr
        import ctypes
        assert ctypes.CDLL(str(out)).dqo_stand_in() == 7
    finally:
        for pid in _compilers_of(src):  # the first build's orphaned compiler
            os.kill(pid, signal.SIGKILL)
        first.kill()
        first.wait()


def test_temporaries_of_dead_builders_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = native._host()
    stale = tmp_path / f".lib.{host}.{dead.pid}.abc.tmp"
    live = tmp_path / f".lib.{host}.{os.getpid()}.def.tmp"
    other_host = tmp_path / f".lib.elsewhere.{dead.pid}.ghi.tmp"
    for p in (stale, live, other_host):
        p.write_bytes(b"half a library")
    native.build(tmp_path / "lib.so", "base", _stand_in(tmp_path))
    assert not stale.exists()
    assert live.exists() and other_host.exists()  # compiling now, or not ours to judge


def test_concurrent_builders_all_succeed(tmp_path):
    src, out = _stand_in(tmp_path), tmp_path / "cache" / "lib.so"
    builders = [_builder(out, src) for _ in range(3)]
    for b in builders:
        stdout, stderr = b.communicate(timeout=DEADLINE_S)
        assert b.returncode == 0 and "built" in stdout, stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["lib.so"]


def test_a_long_compile_says_so(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(native, "WAIT_REPORT_S", 0.2)
    src = _stand_in(tmp_path, '#include "stall.h"\n' + STAND_IN)
    os.mkfifo(src / "stall.h")

    def release_once_reported():
        deadline = time.monotonic() + DEADLINE_S
        while "still compiling" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(src / "stall.h", "w") as fifo:  # the compiler reads an empty header
            fifo.write("\n")

    releaser = threading.Thread(target=release_once_reported, daemon=True)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        releaser.start()
        native.build(tmp_path / "lib.so", "base", src)
    releaser.join(10)
    assert "still compiling the native CPU kernels" in caplog.text
    assert str(tmp_path / "lib.so") in caplog.text


def test_a_compiler_error_names_the_command_and_its_output(tmp_path):
    src = _stand_in(tmp_path, "this is not C++\n")
    with pytest.raises(native.NativeBuildError, match=r"(?s)the compiler failed.*module\.cpp.*"
                                                      r"error"):
        native.build(tmp_path / "lib.so", "base", src)
    assert list(tmp_path.glob("*.so")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_the_library_name_follows_sources_flags_and_isa(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    src.mkdir()
    for name in (*native.SOURCES, *native.INCLUDED):
        (src / name).write_text(f"// {name}\n")
    stem = native.library_stem("avx2", src)
    assert stem.startswith("_native_avx2_") and native.library_stem("avx2", src) == stem
    assert native.library_stem("base", src) != stem
    (src / native.INCLUDED[0]).write_text("// edited\n")  # an included file, too
    edited = native.library_stem("avx2", src)
    assert edited != stem
    monkeypatch.setattr(native, "CFLAGS", (*native.CFLAGS, "-DX"))
    assert native.library_stem("avx2", src) != edited


def test_prebuilt_library_is_found_for_this_cpu_and_never_for_a_wider_isa(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "PREBUILT_DIR", tmp_path)
    monkeypatch.delenv("DQO_KERNELS_FORCE_JIT", raising=False)
    assert native._find_prebuilt() is None
    avx2 = tmp_path / f"{native.library_stem('avx2')}.cpython-311-x86_64-linux-gnu.so"
    avx2.touch()
    monkeypatch.setattr(native, "isa_tag", lambda: "base")  # a CPU without AVX2
    assert native._find_prebuilt() is None
    base = tmp_path / f"{native.library_stem('base')}.cpython-311-x86_64-linux-gnu.so"
    base.touch()
    assert native._find_prebuilt() == base
    monkeypatch.setattr(native, "isa_tag", lambda: "avx2")
    assert native._find_prebuilt() == avx2
    monkeypatch.setenv("DQO_KERNELS_FORCE_JIT", "1")
    assert native._find_prebuilt() is None


@pytest.mark.skipif(not load.is_available(), reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_split_across_threads_equal_one_thread(dtype, monkeypatch):
    """The threaded path (rows in chunks on several threads) gives the same bits as one."""
    from dqo_kernels import fused_dqo_loss
    torch.manual_seed(0)
    logits = torch.randn(37, 301).to(dtype)
    targets = torch.randint(0, 301, (37,))
    B, T = 13, 40
    lp = -torch.rand(B, T)
    args = (lp, lp - 0.1 * torch.rand(B, T), torch.randn(B, T), torch.zeros(B, T),
            torch.rand(B, T) > 0.3)

    def run():
        x = logits.clone().requires_grad_()
        out = token_logprobs(x, targets, backend="cpp")
        out.backward(torch.ones_like(out))
        res = fused_dqo_loss(*args, behavior_logp=lp - 0.2, is_clip=2.0, backend="cpp")
        return out, x.grad, res.loss, res.returns, res.weights

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(4)
        monkeypatch.setattr(load, "MIN_WORK_PER_THREAD", 1)  # split even these small inputs
        monkeypatch.setattr(load, "LOGPROB_MIN_WORK_PER_THREAD", 1)
        four = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, four):
        assert torch.equal(a, b)
