"""The engine's test build: the C module with the mutation switches and hooks of btt_test.h.

`python tests/testbuild.py` (or `build()`) compiles it with cffi_build.py and
BTT_MUTATIONS=1 into build/test-engine/, as the ASan and TSan builds are made, and only
when a source changed. btt_core/_lib.py loads it instead of the production module when
BTT_TEST_BUILD=1 or BTT_TEST_MUTATION=<name> is set.

Tests use it in two ways:

* in-process, marked `@pytest.mark.testbuild`: conftest.py runs the marked tests of a module
  together in a child interpreter on the test build (`run_in_test_build`), where
  `mutated(name)` switches the engine's behaviour for the duration of a `with`, and
  `set_map_flags`, `commit_step` and `hold_rtt` reach inside an open BTT;
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
import tempfile
from xml.etree import ElementTree

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


# ---- hooks into an open BTT (btt_test.h) --------------------------------------------------

def _lib():
    from btt_core._lib import lib
    if not active():
        raise RuntimeError("the engine's test hooks exist only in the test build: mark the "
                           "test @pytest.mark.testbuild")
    return lib


def set_map_flags(b, lba: int, flags: int) -> None:
    """Error injection: raw Z/E bits on a sector's map entry (E = media error)."""
    from btt_core.engine import _check
    _check(_lib().btt_debug_set_map_flags(b._ptr, lba, flags))


def commit_step(b) -> bool:
    """Advances a group commit by one step (btt_test.h, btt_debug_commit_step), so that
    writes can be staged while it is open. True while a commit is open."""
    from btt_core.engine import _check
    return _check(_lib().btt_debug_commit_step(b._ptr)) == 1


def hold_rtt(b, count: int) -> None:
    """Takes the first `count` read-tracking slots of each arena, as readers parked inside
    a read would (btt_debug_hold_rtt); 0 gives them back."""
    _lib().btt_debug_hold_rtt(b._ptr, count)


# ---- running tests on the test build ------------------------------------------------------

def run_in_test_build(nodeids: list[str]) -> dict[str, tuple[str, str]]:
    """Runs tests (pytest node ids, of one module) together in a child interpreter on the
    test build, in one process so that they share module state as in-process tests do.
    Returns {test name: (outcome, text)}, outcome "passed", "failed" or "skipped"."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "report.xml")
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-o", "addopts=", f"--junitxml={xml}", *nodeids], cwd=ROOT,
                           env=dict(os.environ, **env()), capture_output=True, text=True)
        if not os.path.exists(xml):
            raise AssertionError(f"the test build's pytest failed:\n{p.stdout[-4000:]}"
                                 f"{p.stderr[-3000:]}")
        results = {}
        for case in ElementTree.parse(xml).iter("testcase"):
            outcome, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = "skipped" if child.tag == "skipped" else "failed"
                    text = (child.get("message") or "") + "\n" + (child.text or "")
            results[case.get("name", "")] = (outcome, text.strip())
        return results


if __name__ == "__main__":
    print(build())


def sanitizer_runtime(library: str, packages: str) -> str:
    """gcc's runtime for a sanitizer build (libasan.so, libtsan.so), to preload into a
    child interpreter. Without it the test skips, except under CI, which installs it
    (Makefile, DEB_PACKAGES): there a skip would hide the check, so it fails."""
    import pytest
    path = subprocess.run(["gcc", f"-print-file-name={library}"], capture_output=True,
                          text=True).stdout.strip()
    if os.path.isabs(path) and os.path.exists(path):
        return os.path.realpath(path)
    if os.environ.get("CI"):
        pytest.fail(f"gcc's {library} is not installed (Debian packages {packages})")
    pytest.skip(f"gcc's {library} is not installed")
