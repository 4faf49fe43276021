"""A single-node GlusterFS volume mounted twice, as two "hosts" sharing one file system.

`Volume(workdir).start()` starts glusterd if none runs, creates a replica-2 volume on two
brick directories under `workdir` (`force`: bricks on the root file system are refused
otherwise), sets the options docs/scale-out.md asks for, and mounts it via FUSE at
`workdir/hostA` and `workdir/hostB`. `stop()` undoes exactly that: it unmounts its two
mounts, stops and deletes its volume, and stops glusterd only if it started it. Anything
missing (not root, no /dev/fuse, no glusterd, a mount refused) raises `Unavailable` with
the reason, which the tests turn into a skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

ENV = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", ""))
# What docs/scale-out.md recommends for region files on GlusterFS: close waits for the
# written data (so a released lock means the writes have landed), and no client-side cache
# of small files that could show one mount another mount's stale lease record.
OPTIONS = {"performance.flush-behind": "off", "performance.quick-read": "off",
           "performance.open-behind": "off"}


class Unavailable(Exception):
    """GlusterFS cannot run here; the message says why."""


def _run(*argv, timeout=60, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise Unavailable(f"{' '.join(argv[:4])}: {(p.stderr or p.stdout).strip()}")
    return p


def _glusterd_running() -> bool:
    return _run("gluster", "--mode=script", "volume", "list", timeout=20,
                check=False).returncode == 0


class Volume:
    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.name = f"nbdbtt{uuid.uuid4().hex[:8]}"
        self.host = socket.gethostname()
        self.bricks = [os.path.join(self.workdir, f"brick{i}") for i in (1, 2)]
        self.mounts = [os.path.join(self.workdir, h) for h in ("hostA", "hostB")]
        self.glusterd_pid: int | None = None  # set only if we started it
        self.created = False
        self.mounted: list[str] = []

    def start(self) -> Volume:
        if os.geteuid() != 0:
            raise Unavailable("GlusterFS tests need root (glusterd, FUSE mounts)")
        if not os.path.exists("/dev/fuse"):
            raise Unavailable("no /dev/fuse: FUSE is unavailable here")
        if not (shutil.which("glusterd", path=ENV["PATH"]) and
                shutil.which("mount.glusterfs", path=ENV["PATH"])):
            raise Unavailable("glusterd or mount.glusterfs missing (Debian glusterfs-server, "
                              "glusterfs-client: make deps)")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if not _glusterd_running():
            pidfile = os.path.join(self.workdir, "glusterd.pid")
            _run("glusterd", "-p", pidfile, f"--log-file={self.workdir}/glusterd.log")
            deadline = time.monotonic() + 20
            while not _glusterd_running():
                if time.monotonic() > deadline:
                    raise Unavailable("glusterd did not answer within 20 s")
                time.sleep(0.2)
            with open(pidfile) as f:
                self.glusterd_pid = int(f.read())
        for b in self.bricks:
            os.makedirs(b)
        _run("gluster", "--mode=script", "volume", "create", self.name, "replica", "2",
             *[f"{self.host}:{b}" for b in self.bricks], "force")
        self.created = True
        for key, value in OPTIONS.items():
            _run("gluster", "--mode=script", "volume", "set", self.name, key, value)
        _run("gluster", "--mode=script", "volume", "start", self.name)
        for m in self.mounts:
            os.makedirs(m)
            _run("mount", "-t", "glusterfs", f"{self.host}:/{self.name}", m)
            self.mounted.append(m)

    def stop(self) -> None:
        for m in reversed(self.mounted):
            # A server killed a moment ago may still hold a file open for an instant.
            for _ in range(50):
                if _run("umount", m, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                _run("umount", "-l", m, check=False)
        self.mounted = []
        if self.created:
            _run("gluster", "--mode=script", "volume", "stop", self.name, "force", check=False)
            _run("gluster", "--mode=script", "volume", "delete", self.name, check=False)
            self.created = False
        if self.glusterd_pid is not None:
            try:
                os.kill(self.glusterd_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.glusterd_pid = None
