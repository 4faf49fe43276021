"""A region file on disk: its lock, and its model opened from what the file holds."""
from __future__ import annotations

import errno
import fcntl
import os
import re

from btt_core import BttError
from nvdimm.errors import NdError
from nvdimm.labels import LabelArea, LabelError
from nvdimm.lease import TTL, Lease, acquire, refuse_if_held, wanted
from nvdimm.media import FileMedia
from nvdimm.region import Region
from nvdimm.stores import AreaStore, NoLabels

DEVICE_NAME = re.compile(r"(namespace|btt|region)\d+(\.\d+)?$")


class RegionLock:
    """What keeps a region file to one server: its flock, and on file systems whose locks
    another host enforces (or may not), a lease file as well (nvdimm/lease.py)."""

    def __init__(self, fd: int, lease: Lease | None):
        self.fd, self.lease = fd, lease

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()
        os.close(self.fd)


def lock_region(path: str, lease: str = "auto", ttl: float = TTL) -> RegionLock:
    """Takes the region file's exclusive lock, and its lease if `lease` (auto, on, off)
    asks for one, or raises BttError/NdError(EBUSY) naming the lock or the holder.

    Two servers over one region would each run an engine that believes it owns the BTT's
    free blocks, and corrupt it. flock belongs to the open file, so the lock survives
    nbdkit's daemon fork and goes away with the process, even after kill -9. Across hosts
    it is as good as the file system's lock manager (docs/scale-out.md): the lease does not
    depend on it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # paths come resolved
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BttError(errno.EBUSY, f"{path} is locked by another server (it is served by "
                       f"another process, which holds the file's lock); use that server's "
                       f"control socket (--control)") from None
    try:
        held = acquire(path, ttl) if wanted(path, lease) else None
    except BaseException:
        os.close(fd)
        raise
    return RegionLock(fd, held)


def check_region_free(path: str, lease: str = "auto") -> None:
    """Raises if another server holds the region (its lock, or a fresh lease); takes
    nothing and writes nothing."""
    lock_region(path, lease="off").close()
    if wanted(path, lease):
        refuse_if_held(path)


def open_region(path: str, region_id: int, *, autobind: bool = True,
                read_only: bool = False) -> Region:
    """The model of one region file: labelled if a label area is found, else label-less."""
    writable = os.access(path, os.W_OK) and not read_only
    try:
        area = LabelArea.detect(path, writable=writable)
    except LabelError as e:
        raise NdError(e.errno, f"{path}: {e.message}") from None
    if area is not None:
        store: AreaStore | NoLabels = AreaStore(area)
    else:
        store = NoLabels(os.path.getsize(path))
    region = Region(store, FileMedia(path), region_id=region_id, read_only=not writable,
                    autobind=autobind)
    region.path = path
    return region
