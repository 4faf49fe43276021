"""A connection's Python thread state lives from open() to close() (plugin/pythread.py):
requests do not build and tear one down each, and connections that come and go leave none
behind or crash the interpreter."""
import shutil
import signal
import subprocess
import threading
import time

import nbd
import pytest

from btt_core import Btt
from plugin import pythread

from conftest import MiB
from nbd_helpers import Server, connect


def test_pin_is_released_only_on_its_own_thread():
    before = pythread.held
    pins, results = [], []
    pin_taken, other_done = threading.Event(), threading.Event()

    def owner():
        pins.append(pythread.keep_thread_state())
        pin_taken.set()
        other_done.wait(10)
        results.append(pins[0].release())  # the owner can
        results.append(pins[0].release())  # but only once

    def other():
        pin_taken.wait(10)
        results.append(pins[0].release())  # another thread cannot
        other_done.set()

    threads = [threading.Thread(target=owner), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [False, True, False]
    assert pythread.held == before


def test_the_connection_thread_is_not_pinned_twice(monkeypatch):
    """With nbdkit --threads 1 the connection thread runs the requests itself: open() has
    pinned it already, and a second pin there would never be given back. A worker thread
    is pinned once, and close() deletes its state after it has ended."""
    ensured, deleted = [], []
    monkeypatch.setattr(pythread, "_ensure", lambda: ensured.append(1) or 1)
    monkeypatch.setattr(pythread, "_this_state", lambda: 12345)
    monkeypatch.setattr(pythread, "_clear", lambda state: None)
    monkeypatch.setattr(pythread, "_delete", deleted.append)
    monkeypatch.setattr(pythread, "_orphans", [])  # no fake state outlives the test
    workers = pythread.ConnectionThreads()  # made on the connection thread, as open() does
    call = workers.pinned(lambda x: x + 1)
    assert call(1) == 2 and ensured == []
    t = threading.Thread(target=lambda: [call(1), call(2)])
    t.start()
    t.join()
    assert ensured == [1]
    if pythread._CAN_DELETE_OTHER_STATES:
        # pthread_join can return a moment before /proc/self/task/TID is gone
        deadline = time.monotonic() + 5
        while workers.release() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert workers.release() == 0 and deleted == [12345]


def _mmaps_during(pid: int, work, out) -> int:
    """mmap plus munmap calls made by every thread of pid while work() runs (strace's
    summary goes to the file out)."""
    tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=mmap,munmap", "-o", out,
                               "-p", str(pid)], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # attached to every thread before the work starts
        work()
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    with open(out) as f:
        rows = [line.split() for line in f if line.split()[-1:] in (["mmap"], ["munmap"])]
    return sum(int(row[3]) for row in rows)


def _still_serving(s) -> None:
    h = connect(s)
    assert h.pread(4096, 0) == b"y" * 4096
    h.shutdown()
    assert s.proc.poll() is None


def _no_crash_in(log: str) -> None:
    assert "Fatal Python error" not in log and "Traceback" not in log, log[-2000:]


def _region(tmp_path) -> str:
    region = str(tmp_path / "region.img")
    Btt.create(region, size=32 * MiB).close()
    return region


def _mmaps_for_2000_requests(s, tmp_path) -> int:
    """Without a pinned thread state, each of the 2000 requests maps and unmaps a frame
    stack; leaves LBAs 0..63 holding b"y"s."""
    h = connect(s)
    try:
        h.pwrite(b"x" * 4096, 0)

        def requests():
            for i in range(1000):
                h.pread(4096, (i % 64) * 4096)
                h.pwrite(b"y" * 4096, (i % 64) * 4096)

        return _mmaps_during(s.proc.pid, requests, tmp_path / "strace.txt")
    finally:
        h.shutdown()


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_requests_reuse_the_connection_thread_state(tmp_path):
    with Server(tmp_path, [_region(tmp_path)], "durability=none") as s:
        assert _mmaps_for_2000_requests(s, tmp_path) < 200

        # Connections opened and closed, one by one and several at once, give their
        # thread states back without upsetting the interpreter.
        for _ in range(20):
            connect(s).shutdown()
        handles = [connect(s) for _ in range(6)]
        for h in handles:
            assert h.pread(4096, 0) == b"y" * 4096
        for h in handles:
            h.shutdown()
        _still_serving(s)
    _no_crash_in(s.output())


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
@pytest.mark.parametrize("threads", ["4", "1"])  # 1: nbdkit runs no workers at all
def test_parallel_workers_keep_their_thread_states_and_give_them_back(tmp_path, threads):
    """threadmodel=parallel: each worker thread is pinned by its first request, and close()
    deletes the states of the connection's workers, so connections that come and go do not
    leak a thread state per worker (measured: 28 KiB grown over 240 connections, against
    2.7 MiB when close() leaves the states)."""
    with Server(tmp_path, [_region(tmp_path)], "durability=none", "threadmodel=parallel",
                extra=("--threads", threads)) as s:
        assert _mmaps_for_2000_requests(s, tmp_path) < 200

        def churn(n):
            for _ in range(n):
                handles = [connect(s) for _ in range(4)]
                for h in handles:  # several requests in flight reach several workers
                    for k in range(8):
                        h.aio_pread(nbd.Buffer(4096), 4096 * k)
                    while h.aio_in_flight() > 0:
                        h.poll(-1)
                for h in handles:
                    h.shutdown()

        churn(10)
        before = _rss_kib(s.proc.pid)
        churn(80)  # 320 connections: leaked worker states grow the RSS by about 3.5 MiB
        grown = _rss_kib(s.proc.pid) - before
        assert grown < 1536, f"server RSS grew by {grown} KiB over 320 connections"
        _still_serving(s)
    _no_crash_in(s.output())
