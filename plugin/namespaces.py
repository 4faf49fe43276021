"""What the server exports: namespaces, their mode (raw or sector), and their I/O backends.

Until labels are wired in, a region file is one label-less namespace `namespace<R>.0`
covering the whole file (R = position of its region= parameter), autodetected at start:
a valid BTT info block (1.1 at +4 KiB, or 2.0 at 0) means sector mode through the engine,
anything else raw. The registry maps export names (namespace name and alt_name alias) to
namespaces; the control socket changes it at run time.
"""
from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading

from btt_core import Btt, BttError, Io, probe

RAW_SECTOR = 4096  # block size advertised for raw exports
MAX_REQUEST = 32 << 20  # the maximum block size we advertise (btt.h: BTT_MAX_REQUEST)


class RawBackend:
    """Bytes straight through to the file (zero copy into nbdkit's buffers).

    Raw exports follow the same rule as sector exports: requests must be aligned to the
    advertised block size (4096), so every export refuses misaligned I/O alike and a client
    tuned on one mode behaves on the other. A file tail shorter than a block is not exported.
    """

    mode = "raw"

    def __init__(self, path: str, offset: int, size: int, readonly: bool):
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        self.io = Io.file(path, readonly=readonly)
        self.offset, self.readonly = offset, readonly
        self.size = size - size % RAW_SECTOR
        self.sector_size = RAW_SECTOR
        self.uuid = ""

    @staticmethod
    def _check(offset: int, count: int) -> None:
        # nbdkit has already refused requests past the end of the export.
        if (offset | count) & (RAW_SECTOR - 1):
            raise OSError(errno.EINVAL, f"request [{offset}, +{count}) is not aligned to "
                          f"{RAW_SECTOR}-byte blocks")
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
                 durability: str, zero_flag: bool, commit_ms: int):
        self.btt = Btt.open(path, offset=offset, size=size, readonly=readonly,
                            durability=durability)
        self.btt.start_timer(commit_ms)
        self.readonly, self.zero_flag = readonly, zero_flag
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


def lock_region(path: str) -> int:
    """Takes the region file's exclusive lock and returns the descriptor that holds it.

    Two servers over one region would each run an engine that believes it owns the BTT's
    free blocks, and corrupt it. flock belongs to the open file, so the lock survives
    nbdkit's daemon fork and goes away with the process, even after kill -9."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BttError(errno.EBUSY, f"{path} is served by another process (it holds the "
                       f"file's lock)") from None
    return fd


class Namespace:
    def __init__(self, name: str, path: str, offset: int = 0, size: int | None = None,
                 alt_name: str = ""):
        self.name, self.path, self.offset, self.alt_name = name, path, offset, alt_name
        self.size = os.path.getsize(path) - offset if size is None else size
        self.backend = None
        self.detected = None  # probe() result, or None for raw
        self.clients = 0  # open NBD connections (changed under Registry.lock)
        self.settings = {}  # how it was last enabled

    def detect(self) -> str:
        """Autodetection, as on enable: 'sector' if a valid BTT starts here, else 'raw'.
        Damage behind a valid info block is refused rather than exposed raw."""
        try:
            self.detected = probe(self.path, offset=self.offset, size=self.size)
        except BttError as e:
            raise BttError(e.errno, f"{self.name} ({self.path}): {e.strerror}; run "
                           f"`bttctl check-namespace {self.path}`") from None
        return "sector" if self.detected else "raw"

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def enable(self, *, readonly: bool, durability: str, zero_flag: bool, commit_ms: int):
        if self.backend is not None:
            return
        self.settings = dict(readonly=readonly, durability=durability, zero_flag=zero_flag,
                             commit_ms=commit_ms)
        readonly = readonly or not os.access(self.path, os.W_OK)
        if self.detect() == "sector":
            self.backend = SectorBackend(self.path, self.offset, self.size, readonly, durability,
                                         zero_flag, commit_ms)
        else:
            self.backend = RawBackend(self.path, self.offset, self.size, readonly)

    def disable(self) -> None:
        """Connections still open keep the old backend, whose calls now fail ESHUTDOWN."""
        if self.backend:
            backend, self.backend = self.backend, None
            try:
                backend.close()
            except OSError as e:  # e.g. after a failed fdatasync: say so once, plainly
                print(f"{self.name}: closing {self.path}: {e}", file=sys.stderr)

    def description(self) -> str:
        b = self.backend
        if b is None:
            return f"{self.name}: disabled"
        desc = f"{b.mode} mode, {b.sector_size}-byte sectors, {b.size} bytes"
        if b.mode == "sector":
            desc += f", BTT {b.btt.version} uuid {b.uuid}"
        return desc + (", read-only" if b.readonly else "")


class Registry:
    """Export name -> namespace. Changes happen under `lock`; lookups need none."""

    def __init__(self):
        self.lock = threading.Lock()
        self.namespaces: dict[str, Namespace] = {}

    def add(self, ns: Namespace) -> None:
        self.namespaces[ns.name] = ns

    def exports(self) -> list[tuple[str, str]]:
        out = []
        for ns in self.namespaces.values():
            if ns.backend is None:
                continue
            out.append((ns.name, ns.description()))
            if ns.alt_name:
                out.append((ns.alt_name, f"alias of {ns.name}: {ns.description()}"))
        return out

    def get(self, name: str) -> Namespace | None:
        return self.namespaces.get(name)

    def lookup(self, export: str) -> Namespace | None:
        for ns in self.namespaces.values():
            if ns.backend is not None and export in (ns.name, ns.alt_name):
                return ns
        return None

    def default(self) -> str:
        for ns in self.namespaces.values():
            if ns.backend is not None:
                return ns.name
        return ""
