"""Socket activation: the listening sockets systemd (or systemd-socket-activate) hands to
`bttctl serve`, and how they reach nbdkit.

The protocol (sd_listen_fds(3)): LISTEN_FDS=N sockets sit at fds 3 .. 3+N-1, meant for the
process whose pid is LISTEN_PID. They are meant for us, but nbdkit is the server, and
nbdkit takes them only when LISTEN_PID is its own pid, which is not known until it has
been forked. So nbdkit is started through `sh -c 'LISTEN_PID=$$ exec nbdkit ...'`: the
shell knows its own pid, and exec keeps it.
"""
from __future__ import annotations

import os
import socket
import stat

SD_LISTEN_FDS_START = 3  # the first fd systemd passes (sd_listen_fds(3))
MAX_LISTEN_FDS = 16  # nbdkit serves a few sockets; a larger count is a broken environment
LISTEN_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# $0 is the shell's name; "$@" is nbdkit's argv, unquoted by no one.
EXEC_WITH_PID = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


class ActivationError(Exception):
    """LISTEN_FDS names something that is not a listening socket: one line."""


def listen_fds(environ) -> list[int]:
    """The sockets passed to this process, or [] when none are, or when they were meant
    for another process (LISTEN_PID is not ours: a variable inherited by mistake)."""
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    if not pid or not count or not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit() or not 1 <= int(count) <= MAX_LISTEN_FDS:
        raise ActivationError(f"LISTEN_FDS={count!r}: expected 1 to {MAX_LISTEN_FDS} sockets")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    for fd in fds:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise ActivationError(f"LISTEN_FDS={count}: fd {fd} is not open") from None
        if not stat.S_ISSOCK(mode):
            raise ActivationError(f"LISTEN_FDS={count}: fd {fd} is not a socket")
    return fds


def address(fd: int) -> str | tuple[str, int]:
    """Where a passed socket listens: a Unix path, or (host, port)."""
    with socket.socket(fileno=os.dup(fd)) as s:
        name = s.getsockname()
        if s.family == socket.AF_UNIX:
            return name.decode() if isinstance(name, bytes) else name
        return name[0], name[1]


def child_env(env: dict, fds: list[int]) -> dict:
    """nbdkit's environment: our LISTEN_* removed (they name our pid, not nbdkit's), and
    LISTEN_FDS set again when there are sockets to pass on."""
    env = {k: v for k, v in env.items() if k not in LISTEN_VARS}
    if fds:
        env["LISTEN_FDS"] = str(len(fds))
    return env


def command(argv: list[str], fds: list[int]) -> list[str]:
    """argv as it must be run so that nbdkit sees LISTEN_PID equal to its own pid."""
    if not fds:
        return argv
    return ["/bin/sh", "-c", EXEC_WITH_PID, "sh", *argv]
