"""The two ways a namespace is served: raw bytes of the region file, or through the BTT
engine (sector mode). Each backend offers pread/pwrite/flush/zero/close; the plugin's data
callbacks call them directly, so the hot path is one C call per request in either mode.
"""
from __future__ import annotations

import errno

from btt_core import Btt, BttError
from btt_core.raw import RawExport

RAW_SECTOR = 4096  # block size of raw exports of label-less (io) namespaces
# TRIM and WRITE_ZEROES carry no payload, so the maximum block size does not bound them: a
# client may zero the whole export in one request. They are done this many bytes per C
# call, because a forced disable waits for the calls running (the call guard in rawio.c and
# btt.c): between two calls it stops the request with ESHUTDOWN.
ZERO_CHUNK = 8 << 20


def _zero_in_chunks(one, offset: int, count: int, size: int, block: int, fua: bool) -> None:
    """Calls one(offset, count, fua) over [offset, +count) in ZERO_CHUNK pieces, FUA on the
    last: FUA commits (or syncs) everything before it too. The whole range is checked first,
    so a refused request touches nothing."""
    if (offset | count) % block:
        raise BttError(errno.EINVAL, f"zero request [{offset}, +{count}) is not aligned to "
                       f"{block}-byte blocks")
    if offset > size or count > size - offset:
        raise BttError(errno.EINVAL, f"zero request [{offset}, +{count}) is beyond the "
                       f"{size}-byte export")
    end = offset + count
    while offset < end:
        n = min(ZERO_CHUNK, end - offset)
        one(offset, n, fua and offset + n == end)
        offset += n


class RawBackend:
    """Bytes straight through to the file, one C call per request (btt_core/raw.py).

    Raw exports follow the same rule as sector exports: requests must be aligned to the
    advertised block size (the namespace's sector_size; 4096 for a label-less file), so every
    export refuses misaligned I/O alike and a client tuned on one mode behaves on the other.
    A file tail shorter than a block is not exported. After close() (a disable or
    reconfigure) every call fails with ESHUTDOWN, and calls already running are waited
    for: none reaches the file afterwards, where the next namespace may live.
    """

    mode = "raw"

    def __init__(self, path: str, offset: int, size: int, readonly: bool,
                 sector_size: int = RAW_SECTOR):
        self.raw = RawExport(path, offset, size, sector_size, readonly)
        self.readonly, self.size, self.sector_size = readonly, self.raw.size, sector_size
        self.uuid = ""
        self.zero_flag = False
        self.pread, self.pwrite = self.raw.pread, self.raw.pwrite  # the hot path
        self.block_status = self.raw.block_status  # the file's holes, in whole blocks

    def flush(self) -> None:
        self.raw.flush()

    def zero_is_fast(self, may_trim: bool) -> bool:
        return True  # a punched hole, plus an allocation when holes are not allowed

    def zero(self, offset: int, count: int, may_trim: bool, fua: bool) -> None:
        # Without may_trim the client asked for allocated zeros (NBD_CMD_FLAG_NO_HOLE).
        _zero_in_chunks(lambda off, n, last_fua: self.raw.zero(
            off, n, allocate=not may_trim, fua=last_fua), offset, count, self.size,
            self.sector_size, fua)

    def close(self) -> None:
        self.raw.close()


class SectorBackend:
    """Through the BTT engine: every sector write atomic."""

    mode = "sector"

    def __init__(self, path: str, offset: int, size: int | None, readonly: bool,
                 durability: str, zero_flag: bool, commit_ms: int, version: str | None = None,
                 log=None):
        self.btt = Btt.open(path, offset=offset, size=size, readonly=readonly,
                            durability=durability, version=version, log=log)
        self.btt.start_timer(commit_ms)
        self.readonly, self.zero_flag, self.durability = readonly, zero_flag, durability
        self.sector_size = self.btt.sector_size
        self.size = self.btt.size
        self.uuid = self.btt.uuid
        self.pread = self.btt.pread  # bound once: the hot path is one C call
        self.pwrite = self.btt.pwrite
        self.block_status = self.btt.block_status  # Z entries and unwritten blocks are holes
        if log is not None and not readonly:
            # Recording (log-writes=): the requests are marked in the log around the engine's
            # calls. Chosen here, once: a server that does not record runs the plain calls.
            self.pwrite = log.recorded_pwrite(self.pwrite)
            self.flush = log.recorded_flush(self.btt.flush)  # type: ignore[method-assign]
            self.zero = log.recorded_zero(self._zero)  # type: ignore[method-assign]

    def flush(self) -> None:
        self.btt.flush()

    def zero_is_fast(self, may_trim: bool) -> bool:
        # Setting Z flags writes no data; without zero-flag=on, zeroing writes every sector.
        return self.zero_flag and may_trim

    def zero(self, offset: int, count: int, may_trim: bool, fua: bool) -> None:
        self._zero(offset, count, may_trim, fua)

    def _zero(self, offset: int, count: int, may_trim: bool, fua: bool) -> None:
        ss = self.sector_size
        one = self.btt.set_zero if self.zero_flag and may_trim else self.btt.write_zeroes
        _zero_in_chunks(lambda off, n, last_fua: one(off // ss, n // ss, last_fua),
                        offset, count, self.size, ss, fua)

    def close(self) -> None:
        self.btt.close()
