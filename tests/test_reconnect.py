"""Clients that reconnect: QEMU's NBD client (reconnect-delay) and libnbd with a retry loop
keep working across a kill -9 of the server and its restart on the same socket. What was
written before the kill (flushed, and with group durability merely acknowledged) and what
is written after both read back."""
import signal
import subprocess
import threading
import time

import nbd
import pytest

from conftest import btt_file
from nbd_helpers import ENV, Server
from testbuild import server_env

pytestmark = pytest.mark.e2e
EXPORT = "namespace0.0"
SLEEP_MS = 5000  # qemu-io's pause between its writes: the kill and restart fall in it


def _sector(tag: int) -> bytes:
    return bytes([tag]) * 4096


def _read(server, offset, length=4096):
    h = nbd.NBD()
    h.set_export_name(EXPORT)
    h.connect_unix(server.sock)
    try:
        return h.pread(length, offset)
    finally:
        h.shutdown()


def _kill_9(server):
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.logf.close()


@pytest.mark.parametrize("delay", [30, 0])
def test_qemu_io_reconnects_across_kill_9(tmp_path, delay):
    """With reconnect-delay the second write waits for the restarted server; with 0 (the
    check that this test sees a reconnect at all) it fails."""
    region = btt_file(tmp_path / "r.img")
    srv = Server(tmp_path, [region], "durability=group").start()
    cmds = ["write -P 0x11 0 64k", "flush", f"sleep {SLEEP_MS}", "write -P 0x22 64k 64k",
            "flush", "read -P 0x11 0 64k", "read -P 0x22 64k 64k"]
    q = subprocess.Popen(["qemu-io", "--image-opts",
                          f"driver=nbd,server.type=unix,server.path={srv.sock},export={EXPORT},"
                          f"reconnect-delay={delay}", *[a for c in cmds for a in ("-c", c)]],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The first write is flushed once the server holds it: qemu-io now sleeps
        deadline = time.monotonic() + 30
        while _read(srv, 0) != _sector(0x11):
            assert time.monotonic() < deadline and q.poll() is None, "qemu-io never wrote"
            time.sleep(0.05)
        seen = time.monotonic()
        _kill_9(srv)
        # The kill falls inside qemu-io's sleep, so its next write meets a dead server
        assert time.monotonic() - seen < (SLEEP_MS / 1000) - 2
        srv.start()
        out, _ = q.communicate(timeout=90)
    finally:
        if q.poll() is None:
            q.kill()
            q.wait()
        srv.stop()
    if delay == 0:
        assert out.count("wrote 65536/65536 bytes") == 1 and "write failed" in out, out
        return
    assert q.returncode == 0, out
    assert out.count("wrote 65536/65536 bytes") == 2 and out.count("read 65536/65536") == 2, out
    assert "failed" not in out.lower() and "error" not in out.lower(), out
    with srv:
        assert _read(srv, 0, 128 << 10) == bytes([0x11]) * (64 << 10) + bytes([0x22]) * (64 << 10)


class RetryingClient:
    """libnbd with the retry loop an application writes: on a failed request, connect
    again (waiting for the server to come back) and repeat the request."""

    def __init__(self, sock, timeout=60.0):
        self.sock, self.timeout, self.reconnects = sock, timeout, 0
        self.h = self._connect()

    def _connect(self):
        deadline = time.monotonic() + self.timeout
        while True:
            h = nbd.NBD()
            h.set_export_name(EXPORT)
            try:
                h.connect_unix(self.sock)
                return h
            except nbd.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def call(self, method, *args):
        while True:
            try:
                return getattr(self.h, method)(*args)
            except nbd.Error:
                self.reconnects += 1
                self.h = self._connect()


def _libnbd_across_kill_9(tmp_path, env=None):
    """Writes before the kill (flushed, and acknowledged only), the kill, writes while the
    server is down (retried until it is back), then reads: {offset: what came back}."""
    region = tmp_path / "r.img"
    region = btt_file(region) if not region.exists() else str(region)
    srv = Server(tmp_path, [region], "durability=group", env=env).start()
    c = RetryingClient(srv.sock)
    c.call("pwrite", _sector(0xA1), 0)
    c.call("flush")
    acked = {4096 * (1 + i): _sector(0xB0 + i) for i in range(16)}
    for off, data in acked.items():
        c.call("pwrite", data, off)  # acknowledged, not flushed
    _kill_9(srv)
    # The write meets the dead server, then retries until the restart below. (The client
    # runs in the thread: an nbdkit started from a short-lived thread exits at once.)
    writer = threading.Thread(target=c.call, args=("pwrite", _sector(0xC1), 1 << 20))
    writer.start()
    try:
        time.sleep(1.0)
        srv.start()
        writer.join(60)
        assert not writer.is_alive()
        c.call("flush")
        got = {off: c.call("pread", 4096, off) for off in [0, 1 << 20, *acked]}
    finally:
        writer.join()
        srv.stop()
    return c.reconnects, got, {0: _sector(0xA1), 1 << 20: _sector(0xC1), **acked}


def test_libnbd_retry_loop_across_kill_9(tmp_path):
    reconnects, got, want = _libnbd_across_kill_9(tmp_path)
    assert reconnects >= 1
    assert got == want


def test_libnbd_retry_check_catches_a_server_without_its_journal(tmp_path):
    """The mutation check: with the intent journal switched off (test-only), the
    acknowledged but unflushed writes are lost, and the comparison above says so. A kill
    just after a group commit loses nothing, hence a few tries."""
    for attempt in range(4):
        run = tmp_path / str(attempt)
        run.mkdir()
        _, got, want = _libnbd_across_kill_9(run, env=server_env("no-journal"))
        if got != want:
            assert got[0] == want[0] and got[1 << 20] == want[1 << 20]  # flushed, rewritten
            return
    pytest.fail("a server without its intent journal lost no acknowledged write")
