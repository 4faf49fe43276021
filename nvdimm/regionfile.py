"""A region file on disk: its lock, and its model opened from what the file holds."""
from __future__ import annotations

import errno
import fcntl
import os
import re

from btt_core import BttError
from nvdimm.errors import NdError
from nvdimm.labels import LabelArea, LabelError
from nvdimm.media import FileMedia
from nvdimm.region import Region
from nvdimm.stores import AreaStore, NoLabels

DEVICE_NAME = re.compile(r"(namespace|btt|region)\d+(\.\d+)?$")


def lock_region(path: str) -> int:
    """Takes the region file's exclusive lock and returns the descriptor that holds it.

    Two servers over one region would each run an engine that believes it owns the BTT's
    free blocks, and corrupt it. flock belongs to the open file, so the lock survives
    nbdkit's daemon fork and goes away with the process, even after kill -9."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # paths come resolved
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BttError(errno.EBUSY, f"{path} is locked by another server (it is served by "
                       f"another process, which holds the file's lock); use that server's "
                       f"control socket (--control)") from None
    return fd


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
