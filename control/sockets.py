"""Socket paths the server binds and removes (the NBD and control sockets), and files it
removes only while they are still its own (the pid file).

Some of these paths are derived by the server itself (a socket beside the region), in
directories other users may write to. Whatever is found at such a path is checked before it
is removed: a regular file is never unlinked to make room for a socket, and at shutdown only
the very socket this process bound is removed.
"""
from __future__ import annotations

import errno
import os
import socket
import stat


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
