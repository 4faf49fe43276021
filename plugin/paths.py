"""The paths the server writes to or removes: region files, sockets.

Some of these paths are derived by the server itself (a socket beside the region, the
journal), in directories other users may write to. Whatever is found at such a path is
checked before it is written or removed: a symbolic link is never followed for writing,
a regular file is never unlinked to make room for a socket, and at shutdown only the very
socket this process bound is removed. (The intent journal gets the same rules in C and
btt_core/engine.py.)
"""
from __future__ import annotations

import errno
import os
import socket
import stat


def open_for_writing(path: str, flags: int = os.O_RDWR) -> int:
    """os.open(path, flags) for writing a region file: refuses a symbolic link at path
    (ELOOP) and anything but a regular file (EINVAL), with a message naming path."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link; refusing to follow it "
                          "for writing (name the file itself)") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file; refusing to write to it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _answers(path: str) -> bool:
    """False only when nothing listens on the socket (ECONNREFUSED): a full backlog
    (EAGAIN) or another user's socket (EACCES) is somebody's live server, never stale."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except ConnectionRefusedError:
            return False
        except OSError as e:
            raise OSError(e.errno or errno.EADDRINUSE,
                          f"{path} is a socket in use ({e.strerror}); refusing to replace it") \
                from None
        try:
            s.recv(18)  # take nbdkit's greeting, so that it does not log a broken pipe
        except OSError:
            pass
        return True


def clear_socket_path(path: str, what: str = "socket") -> None:
    """Makes room to bind a Unix socket at path: nothing there is fine; a socket that
    nothing answers on (left by a killed server) is removed. Anything else raises OSError
    with one line saying why, and is left untouched: a live socket (EADDRINUSE), a regular
    file, a symbolic link or a directory (EEXIST)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else
                "a directory" if stat.S_ISDIR(st.st_mode) else
                "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket")
        raise OSError(errno.EEXIST, f"{what} path {path} is {kind}; refusing to replace it "
                      "(give a path that is free or a stale socket)")
    if _answers(path):
        raise OSError(errno.EADDRINUSE, f"a server is already listening on {path}")
    unlink_if_same(path, (st.st_dev, st.st_ino))


def socket_ident(path: str):
    """(st_dev, st_ino) of the socket at path, or None if there is none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def unlink_if_same(path: str, ident_) -> bool:
    """Removes path only if it is still the socket identified by ident_ (a path another
    process has taken over since is theirs)."""
    if ident_ is None or socket_ident(path) != ident_:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
