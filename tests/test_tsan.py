"""The engine's concurrency tests under ThreadSanitizer (issue 13).

The engine's test build (tests/testbuild.py: the hooks the tests reach inside the engine
with) is built a second time with -fsanitize=thread (cffi_build.py, BTT_SANITIZE=thread
BTT_MUTATIONS=1), and the concurrency tests, plus the crash states with parallel writers,
run against that build in a child interpreter with libtsan preloaded. Python itself is not
instrumented, so only races between the engine's own accesses are reported: exactly the
lanes, RTT, map locks, map cache, epochs and commit pipeline that the C code shares between
threads.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from testbuild import sanitizer_runtime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def tsan_build(tmp_path_factory):
    tsan = sanitizer_runtime("libtsan.so", "libtsan2")
    build = tmp_path_factory.mktemp("tsan")
    subprocess.run([sys.executable, "-c",
                    f"import cffi_build; cffi_build.ffibuilder.compile(tmpdir={str(build)!r})"],
                   cwd=ROOT, env=dict(os.environ, BTT_SANITIZE="thread", BTT_MUTATIONS="1"),
                   check=True,
                   capture_output=True)
    for py in glob.glob(os.path.join(ROOT, "btt_core", "*.py")):
        shutil.copy(py, build / "btt_core")
    assert glob.glob(str(build / "btt_core" / "_btt_cffi*.so")), "TSan build made no module"
    return build, tsan


def under_tsan(tsan_build, tmp_path, *argv):
    """Runs `python argv...` with the TSan build first on the path and libtsan preloaded."""
    build, tsan = tsan_build
    env = dict(os.environ, PYTHONPATH=f"{build}:{HERE}", LD_PRELOAD=tsan, BTT_TEST_BUILD="1",
               BTT_TEST_BUILD_DIR=str(build),
               TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0")
    # TSan needs the address layout it was built for; `setarch -R` turns off the
    # randomisation that can put libraries where it does not expect them.
    return subprocess.run(["setarch", "-R", sys.executable, *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)


def test_the_harness_reports_a_race(tsan_build, tmp_path):
    """A deliberate race (tests/preload/racy.c) run the same way must be reported."""
    lib = tmp_path / "racy.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-fsanitize=thread", "-O1", "-o", str(lib),
                    os.path.join(HERE, "preload", "racy.c")], check=True)
    p = under_tsan(tsan_build, tmp_path, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r}).race()")
    assert p.returncode == 66 and "data race" in p.stderr, p.stderr[-2000:]


def test_the_build_under_test_is_the_sanitized_one(tsan_build, tmp_path):
    p = under_tsan(tsan_build, tmp_path, "-c",
                   "from btt_core import _lib; print(_lib._module.__file__)")
    assert p.returncode == 0 and str(tsan_build[0]) in p.stdout, p.stderr[-2000:]


def test_concurrency_tests_are_free_of_data_races(tsan_build, tmp_path):
    # -s: pytest must not capture fd 2, or a report dies with the halted process. The -k
    # keeps all of test_concurrency.py (its mutation check too: this is the test build) and,
    # of test_crash.py, the parallel writers.
    p = under_tsan(tsan_build, tmp_path, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                   "-o", "addopts=", os.path.join(HERE, "test_concurrency.py"),
                   os.path.join(HERE, "test_crash.py"), "-k", "not crash or parallel_writers")
    report = p.stdout[-3000:] + p.stderr[-6000:]
    assert "ThreadSanitizer" not in p.stderr, report
    assert p.returncode == 0, report
    assert " passed" in p.stdout, report


def test_block_status_racing_commits_is_free_of_data_races(tsan_build, tmp_path):
    """Block status reads the stage tables and hole bitmaps while writers and the
    committer change them (extents.c)."""
    p = under_tsan(tsan_build, tmp_path, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                   "-o", "addopts=", os.path.join(HERE, "test_extents.py"), "-k",
                   "concurrent_commits or while_a_commit_runs")
    report = p.stdout[-3000:] + p.stderr[-6000:]
    assert p.returncode == 0 and "ThreadSanitizer" not in p.stderr, report
