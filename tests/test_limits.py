"""Exhausted resources (issue 16, item 5): the server raises its descriptor limit, caps NBD
connections below what the limit allows, and refuses the excess promptly with one log line
each, instead of spinning on accept(EMFILE) while new clients hang."""
import os
import time
import types

import pytest

from conftest import MiB, btt_file, pattern
from nbd_helpers import Server, connect

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e


@pytest.fixture
def region(tmp_path):
    return btt_file(tmp_path / "region.img", 64 * MiB)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def try_connect(server, timeout=5.0):
    """A handle, None if the server refused the connection, or "hung" if the handshake
    did not finish within timeout (what clients saw of a server out of descriptors)."""
    h = nbd.NBD()
    h.set_export_name("namespace0.0")
    deadline = time.monotonic() + timeout
    try:
        h.aio_connect_unix(server.sock)
        while h.aio_is_connecting():
            if time.monotonic() > deadline:
                return "hung"
            h.poll(100)
    except nbd.Error:
        return None
    return h if h.aio_is_ready() else None


def open_many(server, n):
    """n connection attempts: (the handles that connected, refused, hung)."""
    results = [try_connect(server) for _ in range(n)]
    handles = [h for h in results if h not in (None, "hung")]
    return handles, results.count(None), results.count("hung")


def soft_nofile(pid):
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return int(line.split()[3])


def test_low_descriptor_limit_degrades_into_refusals(tmp_path, region):
    """100 descriptors leave room for 100 - 64 = 36 connections (one descriptor each under
    the serialized models, the default; parallel is below). Before the cap, the 100
    attempts ran nbdkit out of descriptors: accept() failed in a busy loop and clients hung
    in the handshake. Now: 36 connections, 64 prompt refusals, an idle server, and the
    connections it took keep working."""
    with Server(tmp_path, [region], wrap=("prlimit", "--nofile=100:100")) as s:
        cpu0 = cpu_seconds(s.proc.pid)
        handles, refused, hung = open_many(s, 100)
        assert (len(handles), refused, hung) == (36, 64, 0)
        handles[0].pwrite(pattern(1, 0, 4096), 0)
        assert handles[-1].pread(4096, 0) == pattern(1, 0, 4096)
        time.sleep(1)
        assert cpu_seconds(s.proc.pid) - cpu0 < 5  # not spinning
        for h in handles[:10]:
            h.shutdown()
        time.sleep(0.5)  # nbdkit closes them asynchronously
        more, refused, hung = open_many(s, 12)  # room for 10 again
        assert (len(more), refused, hung) == (10, 2, 0)
        for h in handles[10:] + more:
            h.shutdown()
    log = s.output()
    assert log.count("connection refused: 36 connections are open") == 66
    assert "Traceback" not in log and "Too many open files" not in log


def test_parallel_connections_cost_three_descriptors(tmp_path, region):
    with Server(tmp_path, [region], "threadmodel=parallel",
                wrap=("prlimit", "--nofile=100:100")) as s:
        handles, refused, hung = open_many(s, 20)
        assert (len(handles), refused, hung) == (12, 8, 0)
        for h in handles:
            h.shutdown()


def test_soft_limit_is_raised_to_the_hard_limit(tmp_path, region):
    with Server(tmp_path, [region], wrap=("prlimit", "--nofile=100:4096")) as s:
        h = connect(s)  # the plugin has configured itself by now
        assert soft_nofile(s.proc.pid) == 4096
        h.shutdown()


def test_max_connections_parameter(tmp_path, region):
    with Server(tmp_path, [region], "max-connections=3") as s:
        handles, refused, hung = open_many(s, 5)
        assert (len(handles), refused, hung) == (3, 2, 0)
        assert handles[2].pread(4096, 0) == bytes(4096)
        for h in handles:
            h.shutdown()
    assert s.output().count("(max-connections=3)") == 2


def test_max_connections_above_the_limit_is_lowered(tmp_path, region):
    with Server(tmp_path, [region], "max-connections=1000",
                wrap=("prlimit", "--nofile=100:100")) as s:
        handles, refused, hung = open_many(s, 40)
        assert (len(handles), refused, hung) == (36, 4, 0)
        for h in handles:
            h.shutdown()
    assert "max-connections=1000 lowered to 36: the file descriptor limit is 100" in s.output()


def test_serve_passes_max_connections(tmp_path, region):
    import signal
    import subprocess
    import sys

    from nbd_helpers import ENV, ROOT
    sock = str(tmp_path / "s.sock")
    p = subprocess.Popen([sys.executable, "-m", "bttctl.main", "serve", "--region", region,
                          "--socket", sock, "--max-connections", "2"], cwd=tmp_path,
                         env=dict(ENV, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip()
        handles, refused, hung = open_many(types.SimpleNamespace(sock=sock), 3)
        assert (len(handles), refused, hung) == (2, 1, 0)
        for h in handles:
            h.shutdown()
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0
    assert "(max-connections=2)" in p.stderr.read()
