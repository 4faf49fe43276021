"""Recording a server's writes (docs/write-log.md): the Python face of writelog.c.

A WriteLog wraps the file backends of a BTT and its intent journal (every pwrite, hole
punch and completed fdatasync is appended, btt_core/writelog.c) and wraps the server's
request calls so the NBD requests are marked too: a write issued with its data, a zero,
a flush, and each reply. Nothing of this runs unless a log was asked for: the server binds
the wrapped calls instead of the plain ones when it opens the namespace.
"""
from __future__ import annotations

import errno as _errno
import os

from ._lib import ffi, lib
from .engine import DURABILITY, BttError, Io, _check, boot_id

ROLES = {"region": lib.BTT_WL_ROLE_REGION, "journal": lib.BTT_WL_ROLE_JOURNAL}


class WriteLog:
    """One append-only log file, shared by every backend and request it records."""

    def __init__(self, ptr, path: str):
        self._ptr = ptr
        self.path = path

    @classmethod
    def create(cls, path, note: str = "") -> "WriteLog":
        """Creates the log; an existing file (or a link) at path is refused, never reused."""
        out = ffi.new("struct btt_writelog **")
        _check(lib.btt_writelog_create(os.fsencode(path), note.encode()[:255], out))
        return cls(out[0], os.fspath(path))

    def wrap(self, io: Io, role: str, durability: str, ns_offset: int, ns_size: int,
             name: str, boot: bytes) -> Io:
        """A backend that records io's writes; it owns io from now on (io is emptied)."""
        if self._ptr is None:
            raise BttError(_errno.EBADF, "the write log is closed")
        f = ffi.new("struct btt_writelog_file *")
        f.role, f.durability = ROLES[role], DURABILITY[durability]
        f.ns_offset, f.ns_size, f.boot_id = ns_offset, ns_size, list(boot)
        ident = io.ident() if io.kind == "file" else None
        out, target = ffi.new("struct btt_io **"), ffi.new("uint32_t *")
        _check(lib.btt_writelog_wrap(self._ptr, io._ptr, f, os.fsencode(name), out, target))
        io._ptr = None  # the wrapper destroys it
        return _RecordedIo(out[0], io.kind, ident)

    def wrap_btt(self, io: Io, journal: Io | None, *, offset: int, size: int | None,
                 durability: str, path, journal_path: str) -> tuple[Io, Io | None]:
        """The region and journal backends of one BTT, recorded (Btt.open's log=)."""
        ns_size = io.size - offset if size is None else size
        boot = boot_id()
        io = self.wrap(io, "region", durability, offset, ns_size, os.fspath(path), boot)
        if journal is not None:
            try:
                journal = self.wrap(journal, "journal", durability, offset, ns_size,
                                    journal_path, boot)
            except BaseException:
                io.close()  # the caller's io is emptied: this one owns the file now
                raise
        return io, journal

    # ---- the server's request marks ------------------------------------------------

    def _mark(self, kind: int, rid: int, off: int = 0, length: int = 0, data=None,
              aux: int = 0) -> None:
        _check(lib.btt_writelog_mark(self._ptr, kind, rid, off, length,
                                     ffi.NULL if data is None else ffi.from_buffer(data), aux))

    def recorded_pwrite(self, pwrite):
        """pwrite(buf, offset, fua) that marks the request issued and its reply."""
        mark, next_id, fua_flag = self._mark, self._next_id, lib.BTT_WL_FUA
        write, reply = lib.BTT_WL_NBD_WRITE, lib.BTT_WL_NBD_REPLY

        def logged(buf, offset: int, fua: bool = False) -> None:
            rid = next_id()
            mark(write, rid, offset, len(buf), buf, fua_flag if fua else 0)
            _replied(mark, reply, rid, pwrite, buf, offset, fua)

        return logged

    def recorded_zero(self, zero):
        """zero(offset, count, may_trim, fua), marked as pwrite's are (the range reads zeros)."""
        mark, next_id, fua_flag = self._mark, self._next_id, lib.BTT_WL_FUA
        kind, reply = lib.BTT_WL_NBD_ZERO, lib.BTT_WL_NBD_REPLY

        def logged(offset: int, count: int, may_trim: bool, fua: bool) -> None:
            rid = next_id()
            mark(kind, rid, offset, count, None, fua_flag if fua else 0)
            _replied(mark, reply, rid, zero, offset, count, may_trim, fua)

        return logged

    def recorded_flush(self, flush):
        mark, next_id = self._mark, self._next_id
        kind, reply = lib.BTT_WL_NBD_FLUSH, lib.BTT_WL_NBD_REPLY

        def logged() -> None:
            rid = next_id()
            mark(kind, rid)
            _replied(mark, reply, rid, flush)

        return logged

    def _next_id(self) -> int:
        return lib.btt_writelog_next_id(self._ptr)

    @property
    def failed(self) -> bool:
        return bool(lib.btt_writelog_failed(self._ptr))

    def close(self) -> None:
        """Drops the creator's reference: the file closes once the wrapped backends are
        closed too."""
        if self._ptr is not None:
            lib.btt_writelog_release(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()


class _RecordedIo(Io):
    """A wrapped backend: still names the file below it (Btt.close removes the journal
    only while its path names that file)."""

    def __init__(self, ptr, kind: str, ident):
        super().__init__(ptr, kind)
        self._ident = ident

    def ident(self) -> tuple[int, int]:
        if self._ident is None:
            raise BttError(_errno.EINVAL, "not a file backend")
        return self._ident


def _replied(mark, reply: int, rid: int, call, *args) -> None:
    """Runs the request and marks its reply: the errno, or 0 once it succeeded."""
    try:
        call(*args)
    except OSError as e:
        mark(reply, rid, aux=e.errno or _errno.EIO)
        raise
    mark(reply, rid)
