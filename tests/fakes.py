"""Test doubles of the model's collaborators: a label store and BTT media in memory, and a
label medium over a bytearray. Production code has none of these."""
from __future__ import annotations

import dataclasses
import errno

from nvdimm.constants import BTT_INFO_OFFSET, KiB
from nvdimm.errors import NdError
from nvdimm.labels import NamespaceLabel


class MemoryStore:
    """Labels kept in a list: for tests, and to see every save the model makes."""

    labelled = True

    def __init__(self, size: int, version: str = "1.2", namespaces=(), reserved=()):
        self.size, self.version = size, version
        self.labels = [dataclasses.replace(label) for label in namespaces]
        self.reserved = list(reserved)
        self.saves = 0
        self.fail_with: OSError | None = None  # tests: make the next save fail

    def load(self) -> list[NamespaceLabel]:
        return [dataclasses.replace(label) for label in self.labels]

    def reserved_extents(self) -> list[tuple[int, int]]:
        return list(self.reserved)

    def save(self, labels: list[NamespaceLabel]) -> None:
        if self.fail_with:
            err, self.fail_with = self.fail_with, None
            raise err
        self.labels = [dataclasses.replace(label) for label in labels]
        self.saves += 1


class MemoryMedia:
    """BTT info blocks as a dict, for tests. Keys are (namespace offset, version)."""

    def __init__(self):
        self.btts: dict[tuple[int, str], dict] = {}
        self.damaged: set[tuple[int, str]] = set()  # a valid info block, rotten metadata
        self.formats = 0

    def probe(self, offset: int, size: int, version: str) -> dict | None:
        if (offset, version) in self.damaged:
            raise NdError(errno.EUCLEAN, f"BTT {version} at offset {offset} is damaged")
        info = self.btts.get((offset, version))
        if not info or info.get("raw_size", 0) > size:
            return None  # as on a file: an arena past the (shrunk) namespace's end is no BTT
        return {k: v for k, v in info.items() if k != "raw_size"}

    def format(self, offset: int, size: int, *, version: str, uuid, parent_uuid,
               sector_size: int, old_size: int | None = None) -> dict:
        self.formats += 1
        nlba = (size - size // 64 - BTT_INFO_OFFSET[version] - 8 * KiB) // sector_size
        info = {"version": version, "uuid": uuid, "parent_uuid": parent_uuid,
                "sector_size": sector_size, "size": nlba * sector_size}
        self.btts[(offset, version)] = dict(info, raw_size=size)
        return info

    def erase_btt(self, offset: int, size: int) -> None:
        """Every BTT info block of the namespace [offset, offset+size) is gone."""
        self.wipe(offset, size)

    def wipe(self, offset: int, length: int) -> None:
        """Zeroes [offset, offset+length): info blocks starting there are gone."""
        for key in [k for k in [*self.btts, *self.damaged]
                    if offset <= k[0] + BTT_INFO_OFFSET[k[1]] < offset + length]:
            self.btts.pop(key, None)
            self.damaged.discard(key)


class MemoryMedium:
    """A bytearray standing in for a label area's btt_core.Io: `writes` records every write
    in order (crash simulation), and reads past the end see zeros like a hole."""

    def __init__(self, data: bytes | bytearray):
        self.data = bytearray(data)
        self.writes: list[tuple[int, bytes]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length]).ljust(length, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))
        self.data[offset:offset + len(data)] = data

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass
