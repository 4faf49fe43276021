"""Spawning our nbdkit server for end-to-end tests: one private socket dir per server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "plugin", "nbdkit_btt.py")
ENV = dict(os.environ, PATH="/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))


class Server:
    def __init__(self, workdir, regions, *params, readonly=False, wrap=(), extra=(), env=None):
        self.env = dict(ENV, **(env or {}))
        self.sock = os.path.join(str(workdir), "nbd.sock")
        self.log = os.path.join(str(workdir), "nbdkit.log")
        self.argv = [*wrap, "nbdkit", "--foreground", "--unix", self.sock,
                     *(["-r"] if readonly else []), *extra, "python", ENTRY,
                     *[f"region={r}" for r in regions], *params]
        self.proc = None
        # With control=PATH, start() also waits until the control socket answers.
        self.control = next((p.split("=", 1)[1] for p in params
                             if str(p).startswith("control=")), None)

    def uri(self, export="namespace0.0"):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def start(self, timeout=30, control_timeout=15):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.logf, stderr=self.logf)
        # nbdkit binds (the path appears) a moment before it listens; a client that connects
        # in between gets ECONNREFUSED, so wait for the listening state itself.
        self._wait_for(lambda: _listening(self.sock), timeout, "nbdkit did not start")
        if self.control:
            # The plugin binds its control socket after nbdkit's, and a path that exists may
            # not listen yet: wait for a connection to be taken.
            self._wait_for(lambda: _answers(self.control), control_timeout,
                           "the control socket did not answer")
        return self

    def _wait_for(self, ready, timeout, what):
        deadline = time.time() + timeout
        while not ready():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what}: {self.output()[-3000:]}")
            time.sleep(0.02)

    def output(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)  # nbdkit waits for connected clients; do not wait forever
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.logf.close()
        # The process has exited, so the socket path is no longer anybody's: remove it so
        # that a restart cannot race with an old nbdkit unlinking it.
        if os.path.exists(self.sock):
            os.unlink(self.sock)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _listening(path: str) -> bool:
    """Whether a Unix socket is bound at path and listening (/proc/net/unix: flags
    __SO_ACCEPTCON), without connecting to it: a probe connection would count as a client."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def connect(server, export="namespace0.0", strict=True):
    import nbd
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_export_name(export)
    h.connect_unix(server.sock)
    return h
