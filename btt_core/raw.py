"""A namespace served raw, through C (rawio.c): one call per request with the GIL released,
and calls still running when the export is closed are waited for, so none reaches the file
after a disable."""
from __future__ import annotations

import os

from ._lib import ffi, lib
from .engine import _block_status, _check, _server_io


class RawExport:
    """Bytes [offset, offset+size) of a file, in whole blocks; requests must be aligned."""

    def __init__(self, path, offset: int, size: int, block: int, readonly: bool):
        io = ffi.new("struct btt_io **")
        _check(lib.btt_file_open(os.fsencode(path), int(readonly), 0, 0, io))
        out = ffi.new("struct btt_raw **")
        rc = lib.btt_raw_open(io[0], offset, size, block, int(readonly), out)
        if rc:
            lib.btt_io_destroy(io[0])
            _check(rc)
        self._ptr = out[0]  # valid until __del__: late calls from other threads get ESHUTDOWN
        self.size = lib.btt_raw_size(self._ptr)
        self.pread, self.pwrite = _server_io(self._ptr, lib.btt_raw_pread, lib.btt_raw_pwrite)
        self.block_status = _block_status(self._ptr, lib.btt_raw_block_status)

    def zero(self, offset: int, count: int, allocate: bool = False, fua: bool = False) -> None:
        """A punched hole; `allocate` gives it storage again (NBD's NO_HOLE)."""
        flags = (lib.BTT_RAW_ALLOCATE if allocate else 0) | (lib.BTT_FUA if fua else 0)
        _check(lib.btt_raw_zero(self._ptr, offset, count, flags))

    def flush(self) -> None:
        _check(lib.btt_raw_flush(self._ptr))

    def close(self) -> None:
        """Waits for the calls running, syncs; every later call fails with ESHUTDOWN."""
        _check(lib.btt_raw_shutdown(self._ptr), "close")

    def __del__(self):
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr is not None:
            lib.btt_raw_shutdown(ptr)
            lib.btt_raw_free(ptr)
