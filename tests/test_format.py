"""On-media bytes: info blocks (§3), initial map and flog (§6.2), the worked example (§6.6)."""
import struct
import uuid

import pytest

from btt_core import Btt, Io, pack_info, unpack_info

from conftest import GiB, MiB, mem_btt

SIG = b"BTT_ARENA_INFO\x00\x00"


def ref_fletcher64(block: bytes) -> int:
    """Independent of the C code: 1024 LE u32 words, lo/hi sums mod 2^32."""
    lo = hi = 0
    for (w,) in struct.iter_unpack("<I", block):
        lo = (lo + w) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFF
    return hi << 32 | lo


def ref_info_block(u, parent, major, minor, lbasize, a) -> bytes:
    head = struct.pack("<16s16s16sIHHIIIIIIQQQQQ", SIG, u, parent, 0, major, minor, lbasize,
                       a["external_nlba"], a["internal_lbasize"], a["internal_nlba"], 256, 4096,
                       a["nextoff"], a["dataoff"], a["mapoff"], a["logoff"], a["info2off"])
    block = head + bytes(4096 - len(head))
    return block[:0xFF8] + struct.pack("<Q", ref_fletcher64(block))


@pytest.mark.parametrize("version,lbasize", [("1.1", 4096), ("2.0", 4096), ("1.1", 512),
                                             ("1.1", 520), ("2.0", 4224)])
def test_info_blocks_byte_exact(tmpfile, version, lbasize):
    u = uuid.UUID("e522c556-1b3f-4457-8a2e-8d6a1e0ff001")
    with Btt.create(tmpfile, size=1 * GiB, sector_size=lbasize, version=version, uuid=u) as b:
        a = b.arenas[0]
        assert b.uuid == str(u) and b.version == version
    initial = 4096 if version == "1.1" else 0
    major, minor = (1, 1) if version == "1.1" else (2, 0)
    expected = ref_info_block(u.bytes, bytes(16), major, minor, lbasize, a)
    with open(tmpfile, "rb") as f:
        f.seek(initial)
        primary = f.read(4096)
        f.seek(initial + a["info2off"])
        backup = f.read(4096)
    assert primary == expected
    assert backup == expected
    assert unpack_info(primary)["checksum_ok"]


def test_table_row_1gib_4096_v11_on_disk(tmpfile):
    with Btt.create(tmpfile, size=1 * GiB) as b:
        a = b.arenas[0]
        got = (a["external_nlba"], a["internal_nlba"], a["mapoff"], a["logoff"], a["info2off"])
        assert got == (261624, 261880, 0x3FEFA000, 0x3FFFA000, 0x3FFFE000)
        assert b.nlba * b.sector_size == 1071611904
        assert b.parent_uuid == str(uuid.UUID(int=0))  # label-less: null parent (§2.1)


def test_checksum_detects_any_flip():
    block = pack_info({"uuid": uuid.uuid4(), "version_major": 1, "version_minor": 1,
                       "external_lbasize": 4096, "external_nlba": 3829, "internal_lbasize": 4096,
                       "internal_nlba": 4085, "nfree": 256, "infosize": 4096, "dataoff": 4096,
                       "mapoff": 0xFF7000, "logoff": 0xFFB000, "info2off": 0xFFF000})
    assert struct.unpack_from("<Q", block, 0xFF8)[0] == ref_fletcher64(block[:0xFF8] + bytes(8))
    for pos in (0, 0x30, 0x48, 0x800, 0xFF8):
        flipped = bytearray(block)
        flipped[pos] ^= 0x10
        assert not unpack_info(bytes(flipped))["checksum_ok"]


def test_initial_map_and_flog(tmpfile):
    with open(tmpfile, "wb") as f:  # garbage where the map goes: format must zero it
        f.truncate(64 * MiB)
        f.seek(0x100000)
        f.write(b"\xff" * 8192)
    with Btt.create(tmpfile, size=64 * MiB) as b:
        a = b.arenas[0]
    with open(tmpfile, "rb") as f:
        f.seek(4096 + a["mapoff"])
        assert f.read(a["logoff"] - a["mapoff"]) == bytes(a["logoff"] - a["mapoff"])
        f.seek(4096 + a["logoff"])
        flog = f.read(256 * 64)
    for lane in range(256):
        group = flog[lane * 64:(lane + 1) * 64]
        ext = a["external_nlba"]
        assert group[:16] == struct.pack("<4I", lane, ext + lane, ext + lane, 1)
        assert group[16:] == bytes(48)


def test_identity_entries_read_data_block(tmpfile):
    """A fresh kernel BTT returns whatever data block n holds for LBA n (§5)."""
    with open(tmpfile, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(4096 + 4096 + 7 * 4096)  # v1.1: BTT at +4 KiB, data at +4 KiB, block 7
        f.write(b"Q" * 4096)
    with Btt.create(tmpfile, size=64 * MiB) as b:
        assert b.read(7, 1) == b"Q" * 4096


def _slots(io, base, a, lane=0):
    raw = io.read(base + a["logoff"] + 64 * lane, 64)
    return [struct.unpack_from("<4I", raw, 16 * i) for i in range(4)]


def _map(io, base, a, lba):
    return struct.unpack("<I", io.read(base + a["mapoff"] + 4 * lba, 4))[0]


def test_worked_example_section_6_6():
    """v1.1, 1 GiB, 4096-byte sectors, a commit per write (lane 0 every time, as one CPU)."""
    io = Io.memory(1 * GiB)
    Btt.format_io(io, size=1 * GiB, sector_size=4096, version="1.1")
    b = Btt.open_io(io, durability="strict")
    a, base = b.arenas[0], 4096
    assert a["external_nlba"] == 261624
    assert _slots(io, base, a)[0] == (0, 261624, 261624, 1)
    b.write(5, b"5" * 4096)
    assert _slots(io, base, a)[1] == (5, 5, 261624, 2)
    assert _map(io, base, a, 5) == 0xC003FDF8
    b.write(6, b"6" * 4096)
    assert _slots(io, base, a)[0] == (6, 6, 5, 3)
    b.write(7, b"7" * 4096)
    assert _slots(io, base, a)[1] == (7, 7, 6, 1)
    b.write(5, b"x" * 4096)
    assert _slots(io, base, a)[0] == (5, 261624, 7, 2)
    assert _map(io, base, a, 5) == 0xC0000007
    b.close()
    b = Btt.open_io(io, durability="none")  # lane 0's free block is now 261624
    b.write(100, b"y" * 4096)
    assert _map(io, base, b.arenas[0], 100) == 0xC003FDF8
    assert b.read(5, 1) == b"x" * 4096 and b.read(6, 1) == b"6" * 4096
    b.close()


def test_group_mode_defers_flog_until_flush():
    io, b = mem_btt(durability="group")
    a, base = b.arenas[0], 4096
    b.write(3, b"3" * 4096)
    assert _map(io, base, a, 3) == 0  # staged only
    assert b.read(3, 1) == b"3" * 4096  # but visible
    b.flush()
    assert _map(io, base, a, 3) == 0xC0000000 | a["external_nlba"]
    b.close()


def test_a_closed_engine_is_freed_even_if_its_images_were_closed_first():
    """The crash-state harness closes an engine, then its memory images: the engine's
    finalizer used to leak it then (130 KiB a state, 11 GiB a minute in make test-long)."""
    import gc

    def rss_mib():
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) // 1024

    base = Io.memory(36 * MiB)
    Btt.format_io(base, size=36 * MiB, arena_max=16 * MiB)
    before = None
    for i in range(400):
        io, journal = base.clone(), Io.memory(1 << 20)
        b = Btt.open_io(io, durability="group", journal=journal)
        b.close()
        io.close()
        journal.close()
        del b
        if i == 50:
            gc.collect()
            before = rss_mib()
    gc.collect()
    assert rss_mib() - before < 16, f"{rss_mib() - before} MiB grown over 350 engines"
