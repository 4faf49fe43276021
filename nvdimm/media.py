"""Media: finding, laying down and erasing BTT info blocks on a namespace's bytes, through
btt_core (the engine decides what a valid BTT is)."""
from __future__ import annotations

import contextlib
import errno
import os
import uuid as uuidlib

from btt_core import Btt, BttError, Io
from btt_core.checker import read_infoblock_io
from btt_core.engine import probe_io
from nvdimm.errors import NdError


class IoMedia:
    """BTT info blocks on a btt_core `Io` that the caller owns: a file or a memory image.

    Every write goes through the Io, so a recording memory image sees (and orders) exactly
    what a verb does to the media, on the same clock as the label writes."""

    def __init__(self, io):
        self.io = io

    @contextlib.contextmanager
    def _open(self, readonly: bool = False):
        yield self.io

    @staticmethod
    def _info(found: dict) -> dict:
        return {"version": found["version"], "uuid": uuidlib.UUID(found["uuid"]),
                "parent_uuid": uuidlib.UUID(found["parent_uuid"]),
                "sector_size": found["sector_size"], "size": found["size"]}

    def probe(self, offset: int, size: int, version: str) -> dict | None:
        try:
            with self._open(readonly=True) as io:
                found = probe_io(io, offset=offset, size=size, version=version)
        except BttError as e:
            raise NdError(e.errno, f"BTT {version} at file offset {offset}: "
                          f"{e.strerror}") from None
        return self._info(found) if found else None

    @staticmethod
    def _info_blocks(io, offset: int, size: int) -> set[int]:
        """Where valid-looking info blocks of any BTT in [offset, offset+size) lie."""
        blocks: set[int] = set()
        try:
            for found in read_infoblock_io(io, offset=offset, size=size):
                for arena in found["arenas"]:
                    blocks.update(b["offset"] for b in (arena["primary"], arena["backup"])
                                  if b and b["signature_ok"])
        except BttError:
            pass  # nothing readable to find
        return blocks

    def format(self, offset: int, size: int, *, version: str, uuid, parent_uuid,
               sector_size: int, old_size: int | None = None) -> dict:
        """Lays down a fresh BTT, synced, with arena 0's primary info block written last
        (btt_format's order), so that write is what makes it exist. A BTT that was there
        (over `old_size` bytes, when the namespace is being resized) is overwritten in
        place, not erased first, and its info blocks that the new BTT does not reuse are
        zeroed afterwards: in a label-less file the new primary is the commit point."""
        try:
            with self._open() as io:
                before = self._info_blocks(io, offset, max(size, old_size or 0))
                # A BTT already here (a reconfigure) must stop opening before its map and
                # flog are overwritten, or a crash in between would serve its old info
                # block over new metadata: with its primary gone it is refused (EUCLEAN).
                self._zero(io, before & {offset, offset + 4096})
                Btt.format_io(io, offset=offset, size=size, sector_size=sector_size,
                              version=version, uuid=uuid, parent_uuid=parent_uuid)
                io.sync()
                self._zero(io, before - self._info_blocks(io, offset, size))
        except BttError as e:
            raise NdError(e.errno, f"laying down a BTT at file offset {offset}: "
                          f"{e.strerror}") from None
        info = self.probe(offset, size, version)
        if info is None:  # the engine formatted it; a probe that misses it is a bug to report
            raise NdError(errno.EIO, f"the BTT just laid down at file offset {offset} is "
                          "not found again")
        return info

    @staticmethod
    def _zero(io, blocks) -> None:
        if blocks:
            for where in sorted(blocks):
                io.write(where, bytes(4096))
            io.sync()

    def erase_btt(self, offset: int, size: int) -> None:
        """Zeroes every BTT info block of the namespace [offset, offset+size): the first
        8 KiB (1.1 at +4 KiB, 2.0 at 0, as ndctl zeroes), the last 4 KiB (a one-arena BTT's
        backup), and every primary and backup an arena walk finds. Zeroing primaries alone
        would leave valid backups, which a probe rightly reports as a damaged BTT."""
        with self._open() as io:
            blocks = {offset, offset + 4096, offset + size - 4096}
            blocks |= self._info_blocks(io, offset, size)
            blocks = {b for b in blocks if offset <= b <= offset + size - 4096}
            primaries = {offset, offset + 4096}
            # Backups first: a crash in between leaves a valid primary (a BTT that still
            # opens), never a lone backup that makes the namespace refuse to enable.
            self._zero(io, blocks - primaries)
            self._zero(io, primaries & blocks)

    def wipe(self, offset: int, length: int) -> None:
        with self._open() as io:
            io.write(offset, bytes(length))
            io.sync()


class FileMedia(IoMedia):
    """BTT info blocks in a region file, through btt_core; opened for each operation, so
    a server holds no descriptor of its own between verbs."""

    def __init__(self, path):
        super().__init__(None)
        self.path = os.fspath(path)

    @contextlib.contextmanager
    def _open(self, readonly: bool = False):
        io = Io.file(self.path, readonly=readonly)
        try:
            yield io
        finally:
            io.close()
