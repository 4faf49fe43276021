"""Opening a region file for writing without being redirected.

Region files are named by users, but the server may derive paths beside them; whatever is
found at a path is checked before it is written: a symbolic link is never followed and only
a regular file is written. (The intent journal gets the same rules in C, btt_file_open.)
"""
from __future__ import annotations

import errno
import os
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
