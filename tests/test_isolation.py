"""One tenant's slow flush never stalls another namespace (issue 13).

An LD_PRELOAD shim (tests/preload/slow_sync.c) makes fdatasync on one region file take
1.5 s, as a slow or busy disk would. While a client of that namespace sits in a FLUSH, a
FUA write, a FUA WRITE_ZEROES, or a forced check-namespace, a client of another namespace
reads: it must not wait. Under threadmodel=serialize_all (the old default) it does wait,
and the last test shows that this test catches it.
"""
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from btt_core import Btt

from conftest import MiB
from nbd_helpers import ENV, ROOT, Server, connect

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e
SLOW_MS = 1500
READS = 200


@pytest.fixture(scope="module")
def slow_sync(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("needs gcc")
    out = tmp_path_factory.mktemp("preload") / "slow_sync.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(out),
                    os.path.join(ROOT, "tests", "preload", "slow_sync.c"), "-ldl"], check=True)
    return str(out)


def bttctl(*args):
    return subprocess.run([sys.executable, "-m", "bttctl.main", *args], capture_output=True,
                          text=True, env=dict(ENV, PYTHONPATH=ROOT))


def _flush(s, hb):
    hb.flush()


def _fua_write(s, hb):
    hb.pwrite(b"f" * 4096, 8192, nbd.CMD_FLAG_FUA)


def _fua_zeroes(s, hb):
    hb.zero(64 * 1024, 0, nbd.CMD_FLAG_FUA)


def _forced_check(s, hb):
    hb.shutdown()  # a forced check still refuses (EBUSY) while clients are connected
    r = bttctl("check-namespace", "--control", s.control, "--force", "namespace1.0")
    assert r.returncode == 0, r.stderr


BLOCKERS = {"flush": _flush, "FUA write": _fua_write, "FUA zeroes": _fua_zeroes,
            "check-namespace --force": _forced_check}


def neighbour_reads(tmp_path, slow_sync, threadmodel, blocker):
    """Seconds that READS reads of namespace0.0 take while namespace1.0's client is inside
    `blocker`, and whether the blocker was still running when they were done."""
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    for path in (a, b):
        Btt.create(path, size=32 * MiB).close()
    flag, ctl = tmp_path / "slow", str(tmp_path / "ctl.sock")
    env = {"LD_PRELOAD": slow_sync, "SLOW_SYNC_MATCH": "/b.img", "SLOW_SYNC_MS": str(SLOW_MS),
           "SLOW_SYNC_FLAG": str(flag)}
    with Server(tmp_path, [a, b], "durability=group", f"threadmodel={threadmodel}",
                f"control={ctl}", env=env) as s:
        ha, hb = connect(s, "namespace0.0"), connect(s, "namespace1.0")
        ha.pwrite(b"a" * 4096, 0)
        hb.pwrite(b"b" * 4096, 0)
        flag.touch()  # from now on b.img's disk is slow
        errors = []

        def run():
            try:
                BLOCKERS[blocker](s, hb)
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.6)  # the blocker is inside its first slow fdatasync now
        start = time.monotonic()
        for _ in range(READS):
            assert ha.pread(4096, 0) == b"a" * 4096
        elapsed = time.monotonic() - start
        still_blocked = t.is_alive()
        t.join(60)
        flag.unlink()
        assert not errors, errors
        ha.shutdown()
        if blocker != "check-namespace --force":
            hb.shutdown()
    return elapsed, still_blocked


@pytest.mark.parametrize("blocker", BLOCKERS)
@pytest.mark.parametrize("threadmodel", ["serialize_requests", "parallel"])
def test_a_slow_namespace_does_not_stall_another(tmp_path, slow_sync, threadmodel, blocker):
    elapsed, still_blocked = neighbour_reads(tmp_path, slow_sync, threadmodel, blocker)
    assert still_blocked, "the blocker finished before the reads: the test proved nothing"
    assert elapsed < 0.5 * SLOW_MS / 1000, f"{READS} reads took {elapsed:.2f} s"


def test_the_isolation_test_catches_a_server_wide_lock(tmp_path, slow_sync):
    """serialize_all runs one request at a time for the whole server: the reads wait for the
    other namespace's flush, and the check above would fail."""
    elapsed, _ = neighbour_reads(tmp_path, slow_sync, "serialize_all", "flush")
    assert elapsed > 0.5 * SLOW_MS / 1000, f"{READS} reads took only {elapsed:.2f} s"
