"""The engine's test build: the C module with the mutation switches of btt_core/btt_test.h.

`python tests/testbuild.py` (or `build()`) compiles it with cffi_build.py and
BTT_MUTATIONS=1 into build/test-engine/, as the ASan and TSan builds are made, and only
when a source changed. btt_core/_lib.py loads it instead of the production module when
BTT_TEST_BUILD=1 or BTT_TEST_MUTATION=<name> is set.

Tests use it in two ways:

* in-process, marked `@pytest.mark.testbuild`: conftest.py runs such a test in a child
  interpreter on the test build (`run_in_test_build`), where `mutated(name)` switches the
  engine's behaviour for the duration of a `with`;
* through nbdkit: `Server(..., env=server_env(name))` starts a server whose engine is the
  test build with that mutation on from the start.

A mutation's name is the kebab-case of its enum name without the prefix: BTT_MUT_NO_RTT_WAIT
is "no-rtt-wait".
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(ROOT, "build", "test-engine")
MUTATIONS = ("map-before-flog", "flog-before-data-durable", "reuse-before-commit",
             "rewrite-during-commit", "journal-retired-early", "replay-one-epoch",
             "no-rtt-wait", "no-journal", "flush-before-barrier2")


def _module() -> str | None:
    found = glob.glob(os.path.join(BUILD, "btt_core", "_btt_cffi_test*.so"))
    return found[0] if found else None


def _sources_mtime() -> float:
    paths = glob.glob(os.path.join(ROOT, "btt_core", "*.[ch]"))
    return max(os.path.getmtime(p) for p in [*paths, os.path.join(ROOT, "cffi_build.py")])


def build() -> str:
    """Builds the test module unless it is newer than every C source; returns its path."""
    os.makedirs(BUILD, exist_ok=True)
    with open(os.path.join(BUILD, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest and a concurrent `make` may both ask
        so = _module()
        if so and os.path.getmtime(so) >= _sources_mtime():
            return so
        p = subprocess.run([sys.executable, "-c", "import cffi_build; "
                            f"cffi_build.ffibuilder.compile(tmpdir={BUILD!r})"],
                           cwd=ROOT, env=dict(os.environ, BTT_MUTATIONS="1"),
                           capture_output=True, text=True)
        so = _module()
        if p.returncode or not so:
            raise RuntimeError(f"the engine's test build failed:\n{p.stderr[-3000:]}")
        os.utime(so)  # newer than the sources it was built from, whatever the compiler took
        return so


def env(mutation: str | None = None) -> dict[str, str]:
    """Environment entries that make a child process use the test build (built first)."""
    build()
    extra = {"BTT_TEST_BUILD": "1", "BTT_TEST_BUILD_DIR": BUILD}
    if mutation is not None:
        if mutation not in MUTATIONS:
            raise ValueError(f"unknown mutation {mutation!r}")
        extra["BTT_TEST_MUTATION"] = mutation
    return extra


def server_env(mutation: str) -> dict[str, str]:
    """For `Server(..., env=...)` (tests/nbd_helpers.py): nbdkit's engine is the test build
    with `mutation` switched on."""
    return env(mutation)


def active() -> bool:
    """Whether this process runs the test build."""
    from btt_core import _lib
    return _lib.TEST_BUILD


@contextlib.contextmanager
def mutated(name: str):
    """The engine broken as `name` says while the block runs (test build only)."""
    from btt_core._lib import lib, mutation_value
    if not active():
        raise RuntimeError("mutations exist only in the test build: mark the test "
                           "@pytest.mark.testbuild")
    lib.btt_test_mutation = mutation_value(lib, name)
    try:
        yield
    finally:
        lib.btt_test_mutation = 0


def run_in_test_build(nodeid: str) -> None:
    """Runs one test (a pytest node id) in a child interpreter on the test build; raises
    AssertionError with its output unless it ran and passed."""
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", nodeid], cwd=ROOT, env=dict(os.environ, **env()),
                       capture_output=True, text=True)
    out = p.stdout[-6000:] + p.stderr[-3000:]
    assert p.returncode == 0 and " passed" in p.stdout and " skipped" not in p.stdout, out


if __name__ == "__main__":
    print(build())
