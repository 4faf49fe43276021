"""`bttctl serve --pid-file`: a file holding the server's pid while it serves.

The pid is bttctl's own: it is the process a service manager signals (SIGTERM stops the
server as Ctrl-C does) and the one that removes the file. The path is checked before
nbdkit starts (so a bad path is one line and no server), written once the server answers,
and removed on a clean exit only while it still is the file written here.
"""
from __future__ import annotations

import os
import re
import stat

MAX_PID_TEXT = 64
_PID_TEXT = re.compile(rb"(?:[0-9]{1,20}\n?)?")  # what a pid file holds, or nothing


class PidFileError(Exception):
    """The pid file cannot be used: one line."""


def _running_bttctl(pid: int) -> bool:
    """Whether pid is a live bttctl, not a reused number: only that makes a file in use."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"bttctl" in f.read()
    except OSError:
        return False


class PidFile:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None
        self.created = False
        self.written = False

    def claim(self) -> None:
        """Open (or create) the file without following links; refuse one that is not a
        regular file or names another live server."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                self.created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
        except OSError as e:
            raise PidFileError(f"--pid-file {self.path}: {(e.strerror or str(e)).lower()}"
                               ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise PidFileError(f"--pid-file {self.path}: not a regular file")
        old = os.read(fd, MAX_PID_TEXT + 1)
        if not self.created and (st.st_size > MAX_PID_TEXT or not _PID_TEXT.fullmatch(old)):
            # Only an empty file or a stale pid file is taken over (rewritten, then removed
            # on exit): any other file is somebody's data.
            os.close(fd)
            raise PidFileError(f"--pid-file {self.path}: exists and is not a pid file "
                               f"({st.st_size} bytes); refusing to overwrite it")
        old = old.strip()
        if old.isdigit() and int(old) != os.getpid() and _running_bttctl(int(old)):
            os.close(fd)
            raise PidFileError(f"--pid-file {self.path}: in use by the running server "
                               f"pid {int(old)}")
        self.fd, self.ident = fd, (st.st_dev, st.st_ino)

    def publish(self) -> None:
        """Write our pid: the server now answers."""
        assert self.fd is not None
        text = f"{os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        if os.pwrite(self.fd, text, 0) != len(text):
            raise OSError(f"--pid-file {self.path}: short write")
        self.written = True

    def release(self) -> None:
        """Close, and remove the file if it is still ours: created or written here, and
        the path still names it (nobody replaced it meanwhile)."""
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        if not (self.created or self.written):
            return
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self.ident and stat.S_ISREG(st.st_mode):
            os.unlink(self.path)
