"""The native library's build: atomic, never waits on another process, never silent, never
stale (issue 15: a build killed mid-way used to wedge every later process).

The builds here compile small stand-ins for csrc/ (no torch headers either way: a blink), and
the builder processes load _native/build.py by path, as setup.py does, so that they do not import
torch. The real library is built and tested by every other kernel test.
"""
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
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
    # no temporary left; the record of the build beside the library
    assert sorted(p.name for p in out.parent.iterdir()) == ["lib.so", "lib.so.json"]
    assert native.check_library(out) is None


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
    assert sorted(p.name for p in out.parent.iterdir()) == ["lib.so", "lib.so.json"]


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
    native.write_record(avx2, [], [])
    monkeypatch.setattr(native, "isa_tag", lambda: "base")  # a CPU without AVX2
    assert native._find_prebuilt() is None
    base = tmp_path / f"{native.library_stem('base')}.cpython-311-x86_64-linux-gnu.so"
    base.touch()
    assert native._find_prebuilt() is None  # no record of its build: never loaded
    native.write_record(base, [], [])
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


# ---- damaged, foreign and planted libraries (issue 27 C) ---------------------------------------

_CACHED = textwrap.dedent("""
    import ctypes, importlib.util, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("native", sys.argv[1])
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    native.source_dir = lambda: Path(sys.argv[2])
    path = native._cached_or_built(False)
    print(path, ctypes.CDLL(str(path)).dqo_stand_in(), flush=True)
""")


def _stand_in_tree(tmp_path: Path, text: str = STAND_IN, name: str = "src") -> Path:
    """A csrc/ stand-in with every file library_stem reads: the cache path's whole machinery."""
    src = tmp_path / name
    src.mkdir()
    (src / native.SOURCES[0]).write_text(text)
    for included in native.INCLUDED:
        (src / included).write_text("")
    return src


needs_compiler = pytest.mark.skipif(
    not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))),
    reason="no C++ compiler")


@needs_compiler
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, damage):
    """A cut library used to kill the loading process (SIGBUS) or fail to open and leave the
    ops on PyTorch for good; a flipped bit ran. Each is found by its record and rebuilt. The
    loads run in subprocesses: a regression would crash them, not the test run."""
    src = _stand_in_tree(tmp_path)
    env = dict(os.environ, DQO_KERNELS_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-c", _CACHED, native.__file__, str(src)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert first.returncode == 0, first.stderr
    lib = Path(first.stdout.split()[0])
    data = bytearray(lib.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    lib.write_bytes(bytes(data))
    assert native.check_library(lib) is not None
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert second.returncode == 0, (second.returncode, second.stderr)
    assert second.stdout.split() == [str(lib), "7"]
    assert f"rebuilding {lib}" in second.stderr
    assert native.check_library(lib) is None


@needs_compiler
def test_a_library_needing_cpu_features_this_cpu_lacks_is_rebuilt(tmp_path, monkeypatch):
    src = _stand_in_tree(tmp_path)
    monkeypatch.setattr(native, "source_dir", lambda: src)
    monkeypatch.setenv("DQO_KERNELS_CACHE", str(tmp_path / "cache"))
    lib = native._cached_or_built(False)
    record = json.loads(native.record_path(lib).read_text())
    assert set(record["cpu_flags"]) == native.required_cpu_flags()
    record["cpu_flags"].append("avx512_from_another_host")  # SIGILL here
    native.record_path(lib).write_text(json.dumps(record))
    assert native.check_library(lib) == ("built for CPU features this CPU lacks "
                                         "(avx512_from_another_host)")
    assert native._cached_or_built(False) == lib and native.check_library(lib) is None


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_the_compiler_command_and_the_code_it_makes_name_the_library(monkeypatch):
    """CXX="g++ -march=native" on an AVX-512 host built AVX-512 code under the name of the
    plain AVX2 build, which crashed the older hosts sharing the cache."""
    monkeypatch.setenv("CXX", native.compiler())
    monkeypatch.delenv("CXXFLAGS", raising=False)
    plain = native.cache_name("avx2")
    assert {"avx2", "fma", "f16c"} <= native.required_cpu_flags("avx2")
    assert "avx512f" not in native.required_cpu_flags("avx2")
    monkeypatch.setenv("CXXFLAGS", "-mavx512f")
    wide = native.cache_name("avx2")
    assert "avx512f" in native.required_cpu_flags("avx2") and wide != plain
    assert wide.startswith(native.library_stem("avx2"))
    monkeypatch.setenv("CXXFLAGS", "-O2")
    assert native.cache_name("avx2") not in (plain, wide)
    monkeypatch.delenv("CXXFLAGS")
    monkeypatch.setenv("CXX", f"{native.compiler()} -fno-math-errno")
    assert native.cache_name("avx2") != plain


@needs_compiler
@pytest.mark.parametrize("planted", ["none", "world-writable", "foreign-owner", "symlink"])
def test_an_unwritable_cache_falls_back_to_a_private_temp_dir(tmp_path, monkeypatch, caplog,
                                                             planted):
    """A cache that cannot be written (here a file in the way; a read-only filesystem gives
    EROFS, not the PermissionError that was caught) builds in <tmp>/dqo_kernels-<uid>, made
    0700; one that another user owns or can write to, where a library could be planted, is
    never loaded from."""
    if planted == "foreign-owner" and os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    src = _stand_in_tree(tmp_path)
    monkeypatch.setattr(native, "source_dir", lambda: src)
    (tmp_path / "home").write_text("a file, not a directory")
    monkeypatch.setenv("DQO_KERNELS_CACHE", str(tmp_path / "home" / "cache"))
    shared = tmp_path / "tmp" / f"dqo_kernels-{os.getuid()}"
    if planted != "none":  # an attacker's library, with a record that matches it
        evil = tmp_path / "evil" if planted == "symlink" else shared
        evil_src = _stand_in_tree(tmp_path, STAND_IN.replace("7", "666"), "evil-src")
        native.build(evil / native.cache_name(), src=evil_src)  # the name we would look for
        if planted == "world-writable":
            os.chmod(shared, 0o777)
        elif planted == "foreign-owner":
            os.chown(shared, 4242, -1)
            os.chmod(shared, 0o755)
        else:
            shared.symlink_to(evil)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        lib = native._cached_or_built(False)
    import ctypes
    assert ctypes.CDLL(str(lib)).dqo_stand_in() == 7
    assert f"cannot write {tmp_path / 'home' / 'cache'}" in caplog.text
    assert os.stat(lib.parent).st_mode & 0o777 == 0o700
    if planted == "none":
        assert lib.parent == shared
    else:
        assert lib.parent != shared and f"not using {shared}" in caplog.text
