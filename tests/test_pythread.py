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
from conftest import MiB
from nbd_helpers import Server, connect
from plugin import pythread


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


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_requests_reuse_the_connection_thread_state(tmp_path):
    region = str(tmp_path / "region.img")
    Btt.create(region, size=32 * MiB).close()
    with Server(tmp_path, [region], "durability=none") as s:
        h = connect(s)
        try:
            h.pwrite(b"x" * 4096, 0)

            def requests():
                for i in range(1000):
                    h.pread(4096, (i % 64) * 4096)
                    h.pwrite(b"y" * 4096, (i % 64) * 4096)

            # Without the pin each of the 2000 requests maps and unmaps a frame stack.
            assert _mmaps_during(s.proc.pid, requests, tmp_path / "strace.txt") < 200
        finally:
            h.shutdown()

        # Connections opened and closed, one by one and several at once, give their
        # thread states back without upsetting the interpreter.
        for _ in range(20):
            connect(s).shutdown()
        handles = [connect(s) for _ in range(6)]
        for h in handles:
            assert h.pread(4096, 0) == b"y" * 4096
        for h in handles:
            h.shutdown()
        h = connect(s)
        assert h.pread(4096, 0) == b"y" * 4096
        h.shutdown()
        assert s.proc.poll() is None
    log = s.output()
    assert "Fatal Python error" not in log and "Traceback" not in log, log[-2000:]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_parallel_workers_keep_their_thread_states_and_give_them_back(tmp_path):
    """threadmodel=parallel: each worker thread is pinned by its first request, and close()
    deletes the states of the connection's workers, so connections that come and go do not
    leak a thread state per worker (measured: 28 KiB grown over 240 connections, against
    2.7 MiB when close() leaves the states)."""
    region = str(tmp_path / "region.img")
    Btt.create(region, size=32 * MiB).close()
    with Server(tmp_path, [region], "durability=none", "threadmodel=parallel",
                extra=("--threads", "4")) as s:
        h = connect(s)
        try:
            h.pwrite(b"x" * 4096, 0)

            def requests():
                for i in range(1000):
                    h.pread(4096, (i % 64) * 4096)
                    h.pwrite(b"y" * 4096, (i % 64) * 4096)

            assert _mmaps_during(s.proc.pid, requests, tmp_path / "strace.txt") < 200
        finally:
            h.shutdown()

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
        h = connect(s)
        assert h.pread(4096, 0) == b"y" * 4096
        h.shutdown()
        assert s.proc.poll() is None
    log = s.output()
    assert "Fatal Python error" not in log and "Traceback" not in log, log[-2000:]
