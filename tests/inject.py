"""Error injection for tests: damage a BTT on purpose, the way ndctl's
btt-check.sh / btt-errors.sh / btt-pad-compat.sh do. Never use on data you care about.

Each function works offline on a region file (the BTT at [offset, offset+size)) and
returns a short description of what it did.
"""
from __future__ import annotations

from btt_core.checker import read_infoblock
from btt_core.engine import Btt, BttError

from testbuild import set_map_flags

E_FLAG, Z_FLAG = 0x40000000, 0x80000000  # btt.h BTT_MAP_E, BTT_MAP_Z (hex: not in the cdef)


def _arena(path, offset, size, arena):
    found = read_infoblock(path, offset=offset, size=size)
    if not found:
        raise BttError(19, f"{path}: no BTT info block to locate the metadata with")
    arenas = found[0]["arenas"]
    if not 0 <= arena < len(arenas):
        raise BttError(22, f"arena {arena} does not exist (the BTT has {len(arenas)})")
    a = arenas[arena]
    return found[0]["offset"] + a["start"], a["primary"]


def _write(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def set_media_error(path, lba, *, offset=0, size=None) -> str:
    """The sector reads EIO until rewritten (the map entry's E flag, as after poison)."""
    with Btt.open(path, offset=offset, size=size, durability="strict") as b:
        set_map_flags(b, lba, E_FLAG)
    return f"LBA {lba} marked as a media error"


def wipe_info(path, *, which="primary", arena=0, offset=0, size=None) -> str:
    """Zero the primary, the backup, or both info blocks of an arena."""
    base, info = _arena(path, offset, size, arena)
    if which in ("backup", "both"):
        _write(path, base + info["info2off"], bytes(4096))
    if which in ("primary", "both"):
        _write(path, base, bytes(4096))
    return f"arena {arena}: {which} info block zeroed"


def old_padding(path, *, arena=0, offset=0, size=None) -> str:
    """Move every lane's second log slot to the pre-4.15 position (the (0,2) scheme)."""
    base, info = _arena(path, offset, size, arena)
    logoff = base + info["logoff"]
    with open(path, "r+b") as f:
        for lane in range(info["nfree"]):
            f.seek(logoff + 64 * lane)
            g = bytearray(f.read(64))
            g[32:48], g[16:32] = g[16:32], bytes(16)
            f.seek(logoff + 64 * lane)
            f.write(g)
    return f"arena {arena}: log converted to the (0,2) padding scheme"


def rewind_map(path, lba, *, arena=0, offset=0, size=None) -> str:
    """Reset a map entry to identity: after the newest write of a lane, this is exactly
    what a crash between the log and the map update leaves (an interrupted write)."""
    base, info = _arena(path, offset, size, arena)
    _write(path, base + info["mapoff"] + 4 * lba, bytes(4))
    return f"arena {arena}: map entry of LBA {lba} rewound to identity"
