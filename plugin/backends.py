"""The two ways a namespace is served: raw bytes of the region file, or through the BTT
engine (sector mode). Each backend offers pread/pwrite/flush/zero/close; the plugin's data
callbacks call them directly, so the hot path is one syscall (raw) or one C call (sector).
"""
from __future__ import annotations

import errno
import os
import threading

from btt_core import Btt, BttError, Io

RAW_SECTOR = 4096  # block size of raw exports of label-less (io) namespaces
MAX_REQUEST = 32 << 20  # the maximum block size we advertise (btt.h: BTT_MAX_REQUEST)


class RawBackend:
    """Bytes straight through to the file (zero copy into nbdkit's buffers).

    Raw exports follow the same rule as sector exports: requests must be aligned to the
    advertised block size (the namespace's sector_size; 4096 for a label-less file), so every
    export refuses misaligned I/O alike and a client tuned on one mode behaves on the other.
    A file tail shorter than a block is not exported.
    """

    mode = "raw"

    def __init__(self, path: str, offset: int, size: int, readonly: bool,
                 sector_size: int = RAW_SECTOR):
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        self.io = Io.file(path, readonly=readonly)
        self.offset, self.readonly = offset, readonly
        self.size = size - size % sector_size
        self.sector_size = sector_size
        self.uuid = ""
        self.zero_flag = False
        # The Io (hole punching) has its own descriptor and C memory: zero requests and
        # close() take turns on this lock, so close never frees what a zero is using and no
        # zero runs after close (it would reach the file the next backend serves).
        self._zero_lock = threading.Lock()
        self._closed = False

    def _check(self, offset: int, count: int) -> None:
        # nbdkit has already refused requests past the end of the export.
        if (offset | count) & (self.sector_size - 1):
            raise OSError(errno.EINVAL, f"request [{offset}, +{count}) is not aligned to "
                          f"{self.sector_size}-byte blocks")
        if count > MAX_REQUEST:
            raise OSError(errno.EINVAL, f"request larger than {MAX_REQUEST} bytes")

    def pread(self, buf, offset: int) -> None:
        self._check(offset, len(buf))
        if os.preadv(self.fd, [buf], self.offset + offset) != len(buf):
            raise OSError(errno.EIO, "short read from the region file")

    def pwrite(self, buf, offset: int, fua: bool = False) -> None:
        self._check(offset, len(buf))
        if os.pwrite(self.fd, buf, self.offset + offset) != len(buf):
            raise OSError(errno.EIO, "short write to the region file")
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def zero_is_fast(self, may_trim: bool) -> bool:
        return True  # a punched hole, plus an allocation when holes are not allowed

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool) -> None:
        self._check(offset, count)
        with self._zero_lock:
            if self._closed:
                raise OSError(errno.ESHUTDOWN, "the namespace was disabled or reconfigured")
            self.io.zero(self.offset + offset, count)  # a punched hole reads as zeros
            if not may_trim:
                # The client asked for allocated zeros (NBD_CMD_FLAG_NO_HOLE): fill the hole
                # with allocated blocks that read as zeros, so a later write cannot hit ENOSPC.
                os.posix_fallocate(self.fd, self.offset + offset, count)
        if fua:
            os.fdatasync(self.fd)

    def close(self) -> None:
        # Another thread may be about to use self.fd. Closing it would let the number be
        # reused by some other file; pointing it at a read-only /dev/null instead makes any
        # late read come back short (EIO) and any late write fail. Closed in __del__.
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, self.fd)
        os.close(null)
        with self._zero_lock:
            self._closed = True
            self.io.close()

    def __del__(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


class SectorBackend:
    """Through the BTT engine: every sector write atomic."""

    mode = "sector"

    def __init__(self, path: str, offset: int, size: int | None, readonly: bool,
                 durability: str, zero_flag: bool, commit_ms: int, version: str | None = None):
        self.btt = Btt.open(path, offset=offset, size=size, readonly=readonly,
                            durability=durability, version=version)
        self.btt.start_timer(commit_ms)
        self.readonly, self.zero_flag, self.durability = readonly, zero_flag, durability
        self.sector_size = self.btt.sector_size
        self.size = self.btt.size
        self.uuid = self.btt.uuid
        self.pread = self.btt.pread  # bound once: the hot path is one C call
        self.pwrite = self.btt.pwrite

    def flush(self) -> None:
        self.btt.flush()

    def zero_is_fast(self, may_trim: bool) -> bool:
        # Setting Z flags writes no data; without zero-flag=on, zeroing writes every sector.
        return self.zero_flag and may_trim

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool) -> None:
        ss = self.sector_size
        if offset % ss or count % ss:
            raise BttError(errno.EINVAL, f"zero request not aligned to {ss}-byte sectors")
        if self.zero_flag and may_trim:
            self.btt.set_zero(offset // ss, count // ss, fua)
        else:
            self.btt.write_zeroes(offset // ss, count // ss, fua)

    def close(self) -> None:
        self.btt.close()
