"""The BTT engine's Python face: a thin layer over the cffi module.

Every read/write is one call into C with the GIL released; nothing here loops per sector.
Errors come back as BttError (an OSError) carrying the C side's errno and message.
"""
from __future__ import annotations

import errno as _errno
import os
import stat
import uuid as _uuid

from ._lib import ffi, lib
from .errors import ErrnoError

DURABILITY = {"group": lib.BTT_DUR_GROUP, "strict": lib.BTT_DUR_STRICT, "none": lib.BTT_DUR_NONE}
VERSIONS = {"1.1": (1, 1), "2.0": (2, 0)}
MAX_REQUEST = lib.BTT_MAX_REQUEST  # the largest read or write one engine call takes
# The external sector sizes a BTT can have, from the engine (btt.h, btt_sector_sizes).
SECTOR_SIZES = tuple(lib.btt_sector_sizes[0:lib.BTT_NSECTOR_SIZES])
INFO_FIELDS = ("flags", "version_major", "version_minor", "external_lbasize", "external_nlba",
               "internal_lbasize", "internal_nlba", "nfree", "infosize", "nextoff", "dataoff",
               "mapoff", "logoff", "info2off", "checksum")


class BttError(ErrnoError):
    """An engine failure; .errno is meaningful (EIO, ENOSPC, EROFS, EINVAL, EUCLEAN, ...)."""


def _check(rc: int, what: str = "") -> int:
    if rc < 0:
        msg = ffi.string(lib.btt_errmsg()).decode(errors="replace")
        if what:
            msg = f"{what}: {msg}" if msg else what
        raise BttError(-rc, msg or os.strerror(-rc))
    return rc


def _uuid_bytes(value) -> bytes:
    if value is None:
        return bytes(16)
    if isinstance(value, _uuid.UUID):
        return value.bytes
    if isinstance(value, (bytes, bytearray)) and len(value) == 16:
        return bytes(value)
    return _uuid.UUID(str(value)).bytes


def boot_id() -> bytes:
    """This boot's identity: journal entries of another boot are never replayed."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return _uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


class Io:
    """A backing store: a file, or copy-on-write memory that can record writes (tests)."""

    def __init__(self, ptr, kind: str):
        self._ptr = ptr
        self.kind = kind

    @classmethod
    def file(cls, path, *, readonly=False, create=False, min_size=0, mode=0o644) -> "Io":
        """Opened for writing (or created), path must be a regular file and not a symbolic
        link (btt.h, btt_file_open)."""
        out = ffi.new("struct btt_io **")
        _check(lib.btt_file_open(os.fsencode(path), int(readonly), mode if create else 0,
                                 min_size, out))
        return cls(out[0], "file")

    def ident(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the open file: which file a path must still name."""
        dev, ino = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        _check(lib.btt_file_ident(self._ptr, dev, ino))
        return dev[0], ino[0]

    @classmethod
    def memory(cls, size: int) -> "Io":
        ptr = lib.btt_mem_new(size)
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate a memory image")
        return cls(ptr, "memory")

    def clone(self) -> "Io":
        ptr = lib.btt_mem_clone(self._ptr)
        if ptr == ffi.NULL:
            raise BttError(_errno.EINVAL, "only memory images can be cloned")
        return Io(ptr, "memory")

    @property
    def size(self) -> int:
        return lib.btt_io_size(self._ptr)

    def read(self, offset: int, length: int) -> bytes:
        buf = ffi.new("uint8_t[]", length)
        _check(lib.btt_io_read(self._ptr, buf, length, offset))
        return bytes(ffi.buffer(buf, length))

    def write(self, offset: int, data) -> None:
        _check(lib.btt_io_write(self._ptr, ffi.from_buffer(data), len(data), offset))

    def poke(self, offset: int, data) -> None:
        """Memory images: write without recording (assembling crash images)."""
        _check(lib.btt_mem_poke(self._ptr, ffi.from_buffer(data), len(data), offset))

    def sync(self) -> None:
        _check(lib.btt_io_sync(self._ptr))

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeros cheaply (a punched hole on files)."""
        _check(lib.btt_io_zero(self._ptr, offset, length))

    def set_recording(self, on: bool) -> None:
        _check(lib.btt_mem_set_recording(self._ptr, int(on)))

    def fail_sync(self, err: int) -> None:
        _check(lib.btt_mem_fail_sync(self._ptr, err))

    def set_sync_delay(self, usec: int) -> None:
        """Memory images: every sync takes usec, as a disk's would (concurrency tests)."""
        _check(lib.btt_mem_set_sync_delay(self._ptr, usec))

    def records(self):
        """[(clock, "write", offset, bytes) | (clock, "sync", 0, b"")] in issue order; the
        clock is shared by all memory images. The records are cleared."""
        out = []
        kind, seq = ffi.new("int *"), ffi.new("uint64_t *")
        off, length = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        for i in range(lib.btt_mem_record_count(self._ptr)):
            _check(lib.btt_mem_record_get(self._ptr, i, kind, seq, off, length))
            if kind[0] == lib.BTT_REC_SYNC:
                out.append((seq[0], "sync", 0, b""))
            else:
                buf = ffi.new("uint8_t[]", length[0] or 1)
                _check(lib.btt_mem_record_data(self._ptr, i, buf, length[0]))
                out.append((seq[0], "write", off[0], bytes(ffi.buffer(buf, length[0]))))
        lib.btt_mem_record_clear(self._ptr)
        return out

    @staticmethod
    def clock() -> int:
        """The record clock: records stamped before this call have smaller values."""
        return lib.btt_mem_record_clock()

    def close(self) -> None:
        if self._ptr is not None:
            lib.btt_io_destroy(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()


def fletcher64(data: bytes) -> int:
    """Fletcher-64 over little-endian 32-bit words, as Linux computes info-block and label
    checksums (btt-format.md §3; label-format.md §1.4)."""
    if len(data) % 4:
        raise ValueError("fletcher64 needs a multiple of 4 bytes")
    return lib.btt_fletcher64(data, len(data))


def compute_layout(rawsize: int, lbasize: int, arena_max: int = 0) -> list[dict]:
    """The arenas a BTT of rawsize bytes gets (btt-format.md §4); raises on rejection."""
    n = _check(lib.btt_compute_layout(rawsize, lbasize, arena_max, ffi.NULL, 0))
    out = ffi.new("struct btt_arena_layout[]", n)
    lib.btt_compute_layout(rawsize, lbasize, arena_max, out, n)
    return [_layout_dict(out[i]) for i in range(n)]


def _layout_dict(lay) -> dict:
    return {k: getattr(lay, k) for k in ("start", "size", "lba_start", "external_nlba",
                                           "internal_nlba", "internal_lbasize", "nfree", "dataoff",
                                           "mapoff", "logoff", "info2off", "nextoff")}


def info_dict(info, checksum_ok=None) -> dict:
    d: dict[str, object] = {"signature": bytes(info.signature),
                            "uuid": str(_uuid.UUID(bytes=bytes(info.uuid))),
                            "parent_uuid": str(_uuid.UUID(bytes=bytes(info.parent_uuid)))}
    d.update({k: getattr(info, k) for k in INFO_FIELDS})
    if checksum_ok is not None:
        d["checksum_ok"] = bool(checksum_ok)
    return d


def unpack_info(block: bytes) -> dict:
    """Decodes a 4096-byte info block (no validation beyond the checksum flag)."""
    if len(block) != 4096:
        raise ValueError("an info block is 4096 bytes")
    info, ok = ffi.new("struct btt_info *"), ffi.new("int *")
    lib.btt_info_unpack(block, info, ok)
    return info_dict(info, ok[0])


def pack_info(fields: dict) -> bytes:
    """Encodes an info block from §3 field names; the checksum is computed."""
    info = ffi.new("struct btt_info *")
    info.signature = b"BTT_ARENA_INFO\0\0"
    for k, v in fields.items():
        if k in ("uuid", "parent_uuid"):
            setattr(info, k, list(_uuid_bytes(v)))
        elif k == "signature":
            info.signature = list(v)
        elif k != "checksum":
            setattr(info, k, v)
    out = ffi.new("uint8_t[4096]")
    lib.btt_info_pack(info, out)
    return bytes(out)


def _server_io(ptr, c_pread=lib.btt_pread, c_pwrite=lib.btt_pwrite):
    """A server's per-request calls: one C call each and no other Python frame, because
    every microsecond here is paid by every NBD request."""
    from_buffer, fua_flag = ffi.from_buffer, lib.BTT_FUA

    def pread(buf, offset: int) -> None:
        rc = c_pread(ptr, from_buffer(buf, require_writable=True), len(buf), offset)
        if rc:
            _check(rc)

    def pwrite(buf, offset: int, fua: bool = False) -> None:
        rc = c_pwrite(ptr, from_buffer(buf), len(buf), offset, fua_flag if fua else 0)
        if rc:
            _check(rc)

    return pread, pwrite


MAX_EXTENTS = 1024  # extents per block-status answer; a client asks again for the rest


def _block_status(ptr, c_call=lib.btt_block_status):
    """block_status(offset, length, max_extents) -> [(offset, length, type)]: what the bytes
    read as, one C call (btt.h, btt_block_status). type is 0 (data) or lib.BTT_EXTENT_HOLE
    (reads as zeros; NBD's HOLE|ZERO). The answer starts at offset and may stop short."""
    def block_status(offset: int, length: int, max_extents: int = MAX_EXTENTS) -> list:
        out, n = ffi.new("struct btt_extent[]", max_extents), ffi.new("uint32_t *")
        rc = c_call(ptr, offset, length, out, max_extents, n)
        if rc:
            _check(rc)
        return [(e.offset, e.length, e.type) for e in out[0:n[0]]]

    return block_status


def _journal_path(path, offset: int) -> str:
    path = os.fspath(path)
    return f"{path}.journal" if offset == 0 else f"{path}.journal.{offset}"


def _open_journal(jpath: str, readonly: bool) -> Io:
    """The intent journal sits at a path derived from the region's, in a directory others
    may write to: a symbolic link or device planted there is refused, never written through
    (or, read-only, replayed from), and a new journal is private to the server's uid."""
    try:
        st = os.lstat(jpath)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        err = _errno.ELOOP if stat.S_ISLNK(st.st_mode) else _errno.EINVAL
        raise BttError(err, f"intent journal {jpath} is {what}; refusing to use it (remove "
                       "it if it is not yours)")
    try:
        io = Io.file(jpath, readonly=readonly, create=not readonly, mode=0o600)
    except BttError as e:  # raced with the check above: the C open refuses it too
        raise BttError(e.errno, f"intent journal: {e.strerror}") from None
    # A journal someone else planted, or a hard link to a file of theirs, is not ours to
    # write into or replay from, even as a regular file.
    st = os.stat(jpath, follow_symlinks=False)
    problem = None
    if (st.st_dev, st.st_ino) != io.ident():
        problem = "was replaced while it was being opened"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to this server's uid {os.geteuid()}"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links"
    if problem:
        io.close()
        raise BttError(_errno.EPERM, f"intent journal {jpath} {problem}; refusing to use it "
                       "(remove it if it is not yours)")
    return io


def _remove_journal(jpath: str, ident) -> None:
    """Removes the committed journal only while jpath still names the file we had open: a
    path swapped for a link or another file since is not ours to delete."""
    try:
        st = os.lstat(jpath)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == ident:
        os.unlink(jpath)


class Btt:
    """An open BTT. Thread-safe: reads and writes may run concurrently from many threads."""

    def __init__(self, ptr, io: Io, journal: Io | None, journal_path: str | None,
                 readonly: bool, durability: str):
        self._ptr = ptr  # valid until __del__: late calls from other threads get ESHUTDOWN
        self._closed = False
        self._abandoned = False
        self._io = io
        self._journal = journal
        self._journal_path = journal_path  # set when this Btt opened (and owns) io and journal
        self.readonly = readonly
        self.durability = durability
        # Byte-addressed I/O for servers, pread(buf, offset) / pwrite(buf, offset, fua):
        # C checks the alignment (EINVAL); the hot path is these two closures.
        self.pread, self.pwrite = _server_io(ptr)
        self.block_status = _block_status(ptr)
        self.sector_size = lib.btt_sector_size(ptr)
        self.lbasize = lib.btt_lbasize(ptr)
        self.nlba = lib.btt_nlba(ptr)
        self.arenas = self._arenas()
        a0 = self.arenas[0]
        self.version = f"{a0['version_major']}.{a0['version_minor']}"
        self.uuid = a0["uuid"]
        self.parent_uuid = a0["parent_uuid"]

    # ---- creating and opening -------------------------------------------------------

    @classmethod
    def create(cls, path, *, offset=0, size=None, sector_size=4096, version="1.1", uuid=None,
               parent_uuid=None, durability="group", arena_max=0) -> "Btt":
        """Formats a fresh BTT over [offset, offset+size) of path and opens it.

        A missing file is created (sparse) when size is given; size=None means up to the
        end of the file."""
        if size is None and not os.path.exists(path):
            raise BttError(_errno.EINVAL, f"{path} does not exist; give size= to create it")
        io = Io.file(path, create=size is not None, min_size=offset + (size or 0))
        try:
            if size is None:
                size = io.size - offset
            cls.format_io(io, offset=offset, size=size, sector_size=sector_size, version=version,
                          uuid=uuid, parent_uuid=parent_uuid, arena_max=arena_max)
        finally:
            io.close()
        return cls.open(path, offset=offset, size=size, parent_uuid=parent_uuid,
                        durability=durability, version=version)

    @staticmethod
    def format_io(io: Io, *, offset=0, size=None, sector_size=4096, version="1.1", uuid=None,
                  parent_uuid=None, arena_max=0) -> None:
        if version not in VERSIONS:
            raise BttError(_errno.EINVAL, f"version must be one of {', '.join(VERSIONS)}")
        if sector_size not in SECTOR_SIZES:
            raise BttError(_errno.EINVAL, f"sector size {sector_size} is not one of "
                           f"{' '.join(map(str, SECTOR_SIZES))}")
        p = ffi.new("struct btt_format_params *")
        p.ns_offset = offset
        p.ns_size = io.size - offset if size is None else size
        p.lbasize = sector_size
        p.version_major, p.version_minor = VERSIONS[version]
        p.uuid = list(_uuid_bytes(uuid) if uuid is not None else _uuid.uuid4().bytes)
        p.parent_uuid = list(_uuid_bytes(parent_uuid))
        p.arena_max = arena_max
        _check(lib.btt_format(io._ptr, p), "format")

    @classmethod
    def open(cls, path, *, offset=0, size=None, parent_uuid=None, readonly=False,
             durability="group", version=None, journal=None, log=None) -> "Btt":
        """Opens an existing BTT; recovery (map redo, journal replay) runs here. With a
        WriteLog (btt_core/writelog.py), every write to the files is recorded, recovery's
        included."""
        io = Io.file(path, readonly=readonly)
        jpath = os.fspath(journal) if journal else _journal_path(path, offset)
        jio = None
        try:
            if durability == "group":
                if readonly:
                    jio = _open_journal(jpath, readonly=True) if os.path.lexists(jpath) else None
                else:
                    jio = _open_journal(jpath, readonly=False)
            if log is not None and not readonly:
                io, jio = log.wrap_btt(io, jio, offset=offset, size=size, path=path,
                                       durability=durability, journal_path=jpath)
            return cls.open_io(io, offset=offset, size=size, parent_uuid=parent_uuid,
                               readonly=readonly, durability=durability, version=version,
                               journal=jio, _owned_path=jpath)
        except BaseException:
            io.close()
            if jio:
                jio.close()
            raise

    @classmethod
    def open_io(cls, io: Io, *, offset=0, size=None, parent_uuid=None, readonly=False,
                durability="group", version=None, journal: Io | None = None,
                boot=None, _owned_path=None) -> "Btt":
        """Opens a BTT on a backing store the caller keeps owning (memory images in tests)."""
        if durability not in DURABILITY:
            raise BttError(_errno.EINVAL, f"durability must be one of {', '.join(DURABILITY)}")
        if version is not None and version not in VERSIONS:
            raise BttError(_errno.EINVAL, f"version must be one of {', '.join(VERSIONS)}")
        p = ffi.new("struct btt_open_params *")
        p.ns_offset = offset
        p.ns_size = io.size - offset if size is None else size
        p.version = {None: 0, "1.1": 11, "2.0": 20}[version]
        p.check_parent = int(parent_uuid is not None)
        p.parent_uuid = list(_uuid_bytes(parent_uuid))
        p.readonly = int(readonly)
        p.durability = DURABILITY[durability]
        p.journal = journal._ptr if journal else ffi.NULL
        p.boot_id = list(boot if boot is not None else boot_id())
        out = ffi.new("struct btt **")
        _check(lib.btt_open(io._ptr, p, out))
        return cls(out[0], io, journal, _owned_path, bool(readonly), durability)

    # ---- I/O: one C call per request ------------------------------------------------

    def _whole(self, nbytes: int) -> int:
        if nbytes % self.sector_size:
            raise BttError(_errno.EINVAL, f"{nbytes} bytes is not a whole number of "
                           f"{self.sector_size}-byte sectors")
        return nbytes // self.sector_size

    def read(self, lba: int, nsectors: int) -> bytes:
        buf = bytearray(nsectors * self.sector_size)
        self.readinto(lba, buf)
        return bytes(buf)

    def readinto(self, lba: int, buf) -> None:
        n = self._whole(len(buf) if not isinstance(buf, memoryview) else buf.nbytes)
        _check(lib.btt_read(self._ptr, lba, n, ffi.from_buffer(buf, require_writable=True)))

    def write(self, lba: int, data, fua: bool = False) -> None:
        n = self._whole(len(data) if not isinstance(data, memoryview) else data.nbytes)
        _check(lib.btt_write(self._ptr, lba, n, ffi.from_buffer(data), lib.BTT_FUA if fua else 0))

    def write_zeroes(self, lba: int, nsectors: int, fua: bool = False) -> None:
        _check(lib.btt_write_zeroes(self._ptr, lba, nsectors, lib.BTT_FUA if fua else 0))

    def set_zero(self, lba: int, nsectors: int, fua: bool = False) -> None:
        """Zero-flag extension (TRIM / fast WRITE_ZEROES): the sectors read as zeros by
        setting Z in their map entries; no data is written. Linux reads multi-sector runs
        containing Z entries wrongly (btt-format.md §10.1), hence opt-in."""
        _check(lib.btt_set_zero(self._ptr, lba, nsectors, lib.BTT_FUA if fua else 0))

    def flush(self) -> None:
        _check(lib.btt_flush(self._ptr))

    def start_timer(self, interval_ms: int = 50) -> None:
        _check(lib.btt_start_timer(self._ptr, interval_ms))

    # ---- inspection -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.nlba * self.sector_size

    def _arenas(self) -> list[dict]:
        out = []
        info, lay = ffi.new("struct btt_info *"), ffi.new("struct btt_arena_layout *")
        idx0, idx1 = ffi.new("int *"), ffi.new("int *")
        for i in range(lib.btt_narenas(self._ptr)):
            _check(lib.btt_arena_info(self._ptr, i, info, lay))
            lib.btt_flog_scheme(self._ptr, i, idx0, idx1)
            d = info_dict(info)
            d.update(start=lay.start, lba_start=lay.lba_start, size=lay.size,
                     flog_slots=(idx0[0], idx1[0]))
            out.append(d)
        return out

    def stats(self) -> dict:
        s = ffi.new("struct btt_stats *")
        lib.btt_get_stats(self._ptr, s)
        return {k: getattr(s, k) for k in ("writes", "commits", "syncs", "journal_replayed",
                                           "redo_applied", "map_reads", "hole_reads",
                                           "data_reads")}

    def check(self) -> dict:
        """The bitmap rule over map + free lists; {'clean': bool, counts..., 'problems': [...]}."""
        r = ffi.new("struct btt_check_result *")
        msg = ffi.new("char[]", 16384)
        _check(lib.btt_check(self._ptr, r, msg, 16384), "check")
        d = {k: getattr(r, k) for k in ("blocks", "out_of_range", "duplicates", "unreferenced",
                                        "error_entries", "zero_entries")}
        d["problems"] = [line for line in ffi.string(msg).decode().splitlines() if line]
        d["clean"] = not (r.out_of_range or r.duplicates or r.unreferenced)
        return d

    # ---- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Commits everything and releases the files. Threads still holding this object get
        ESHUTDOWN from then on; the C memory goes when the last reference does."""
        if self._closed:
            return
        self._closed = True
        owned = self._journal_path is not None
        try:
            _check(lib.btt_shutdown(self._ptr), "close")
            jpath = self._journal_path
            if jpath is not None and self._journal and not self.readonly:
                # committed: nothing left to replay
                _remove_journal(jpath, self._journal.ident())
        finally:
            if owned:
                if self._journal:
                    self._journal.close()
                self._io.close()

    def abandon(self) -> None:
        """Tests: drop the handle without committing, as a killed process would."""
        self._closed = self._abandoned = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_ptr", None) is None:
            return
        if not self._closed:
            if self._io._ptr is None or (self._journal is not None and
                                         self._journal._ptr is None):
                # The images were finalized first (a reference cycle, e.g. a failed test's
                # traceback, is finalized in any order): committing to them would touch
                # freed memory, so the engine is leaked instead.
                self._ptr = None
                return
            try:
                self.close()
            except OSError:
                pass
        # Closed, the engine no longer touches its images (free_btt frees its own memory
        # only), so it is freed even if they were closed first: the crash-state harness
        # closes them right after the engine and leaked 130 KiB per state before.
        if not self._abandoned:  # an abandoned engine may still have a timer thread
            lib.btt_free(self._ptr)
        self._ptr = None


def probe(path, offset: int = 0, size: int | None = None, version: str | None = None):
    """Autodetection: the BTT's description if a valid one starts in [offset, +size), else None.

    Corrupt metadata behind a valid info block raises BttError(EUCLEAN) rather than
    answering None: serving such a namespace raw would expose the BTT's internals."""
    io = Io.file(path, readonly=True)
    try:
        return probe_io(io, offset, size, version)
    finally:
        io.close()


def probe_io(io: Io, offset: int = 0, size: int | None = None, version: str | None = None):
    """probe() over a backing store the caller keeps owning (a file or a memory image)."""
    try:
        b = Btt.open_io(io, offset=offset, size=size, readonly=True, durability="none",
                        version=version)
    except BttError as e:
        if e.errno != _errno.ENODEV:
            raise
        # No valid primary info block. Linux would now treat the namespace as raw; if a
        # valid backup says a BTT lives here, exposing it raw would hand its map and log
        # to the first writer, so refuse instead.
        from .checker import check_io
        try:
            check_io(io, offset=offset, size=size, version=version)
        except BttError:
            return None
        raise BttError(_errno.EUCLEAN, "the BTT's primary info block is damaged but its backup "
                       "is valid; repair it with `bttctl check-namespace --repair`") from None
    try:
        return {"version": b.version, "uuid": b.uuid, "parent_uuid": b.parent_uuid,
                "lbasize": b.lbasize, "sector_size": b.sector_size, "nlba": b.nlba,
                "size": b.size, "arenas": len(b.arenas)}
    finally:
        b.close()
