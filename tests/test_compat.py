"""Images written by other BTT implementations: old (0,2) flog padding, PMDK flag bits
(§6.3, §6.5)."""
import struct

from btt_core import Btt

from conftest import MiB, mem_btt, pattern

BASE = 4096  # v1.1


def lane_group(io, a, lane):
    return bytearray(io.read(BASE + a["logoff"] + 64 * lane, 64))


def put_group(io, a, lane, group):
    io.poke(BASE + a["logoff"] + 64 * lane, bytes(group))


def slots(io, a, lane):
    g = lane_group(io, a, lane)
    return [struct.unpack_from("<4I", g, 16 * i) for i in range(4)]


def test_old_padding_scheme_0_2_read_and_next_write_lands_in_slot_2():
    io, b = mem_btt(durability="strict")
    b.write(10, pattern(1, 10, 4096))  # lane 0, slot 1
    b.close()
    a = Btt.open_io(io, durability="none").arenas[0]
    # Convert every lane to the pre-4.15 layout: slot 1 moves to slot 2.
    for lane in range(256):
        g = lane_group(io, a, lane)
        g[32:48], g[16:32] = g[16:32], bytes(16)
        put_group(io, a, lane, g)
    b = Btt.open_io(io, durability="strict")
    assert b.arenas[0]["flog_slots"] == (0, 2)
    assert b.read(10, 1) == pattern(1, 10, 4096)
    # Lane 0's newest entry is in slot 2, so its next write goes to slot 0; lane 0 again after.
    b.write(11, pattern(2, 11, 4096))
    s = slots(io, a, 0)
    assert s[0][:2] == (11, 11) and s[1] == (0, 0, 0, 0)
    b.write(12, pattern(3, 12, 4096))
    s = slots(io, a, 0)
    assert s[2][:2] == (12, 12) and s[1] == (0, 0, 0, 0) and s[3] == (0, 0, 0, 0)
    assert b.check()["clean"]
    b.close()
    b = Btt.open_io(io, durability="none")
    assert [b.read(lba, 1) for lba in (10, 11, 12)] == [pattern(i + 1, 10 + i, 4096)
                                                         for i in range(3)]
    b.close()


def test_pmdk_style_flag_bits_in_flog_are_masked():
    io, b = mem_btt(durability="strict")
    b.write(5, pattern(1, 5, 4096))  # lane 0: slot1 = {5, 5, ext, 2}
    b.close()
    a = Btt.open_io(io, durability="none").arenas[0]
    ext = a["external_nlba"]
    for lane in range(256):  # PMDK ORs 0x80000000 (and 0xC0000000) into old/new map
        g = lane_group(io, a, lane)
        for slot in (0, 1):
            lba, old, new, seq = struct.unpack_from("<4I", g, 16 * slot)
            if seq:
                struct.pack_into("<4I", g, 16 * slot, lba, old | 0x80000000, new | 0xC0000000, seq)
        put_group(io, a, lane, g)
    b = Btt.open_io(io, durability="strict")
    assert b.read(5, 1) == pattern(1, 5, 4096)
    b.write(6, pattern(2, 6, 4096))  # lane 0's free block is 5 (masked), not 0x80000005
    assert struct.unpack("<I", io.read(BASE + a["mapoff"] + 24, 4))[0] == 0xC0000005
    assert b.read(6, 1) == pattern(2, 6, 4096) and b.read(5, 1) == pattern(1, 5, 4096)
    assert b.check()["clean"]
    b.close()
    assert ext > 0


def test_interrupted_write_is_redone_at_open():
    """Flog committed, map not: the next open installs the new mapping (§6.5)."""
    io, b = mem_btt(durability="strict")
    b.write(9, pattern(1, 9, 4096))
    b.close()
    a = Btt.open_io(io, durability="none").arenas[0]
    io.poke(BASE + a["mapoff"] + 9 * 4, struct.pack("<I", 0))  # rewind map[9] to identity
    b = Btt.open_io(io, durability="none")
    assert b.stats()["redo_applied"] == 1
    assert b.read(9, 1) == pattern(1, 9, 4096)
    assert b.check()["clean"]
    b.close()


def test_readonly_open_applies_redo_in_memory_only():
    io, b = mem_btt(durability="strict")
    b.write(9, pattern(1, 9, 4096))
    b.close()
    a = Btt.open_io(io, durability="none").arenas[0]
    io.poke(BASE + a["mapoff"] + 9 * 4, struct.pack("<I", 0))
    before = io.read(0, io.size)
    b = Btt.open_io(io, readonly=True, durability="none")
    assert b.read(9, 1) == pattern(1, 9, 4096)
    assert b.check()["clean"]
    b.close()
    assert io.read(0, io.size) == before


def test_v20_and_multi_arena_chain_discovered():
    io, b = mem_btt(size=80 * MiB, version="2.0", arena_max=16 * MiB, durability="strict")
    assert len(b.arenas) == 5 and b.version == "2.0"
    for lba in (0, b.arenas[1]["lba_start"] - 1, b.arenas[1]["lba_start"], b.nlba - 1):
        b.write(lba, pattern(lba, lba, 4096))
    b.close()
    b = Btt.open_io(io, durability="none")
    assert len(b.arenas) == 5
    for lba in (0, b.arenas[1]["lba_start"] - 1, b.arenas[1]["lba_start"], b.nlba - 1):
        assert b.read(lba, 1) == pattern(lba, lba, 4096)
    assert b.check()["clean"]
    b.close()


def test_520_byte_format_exports_512_byte_sectors():
    io, b = mem_btt(size=32 * MiB, sector_size=520, durability="strict")
    assert (b.lbasize, b.sector_size) == (520, 512)
    assert b.arenas[0]["internal_lbasize"] == 576
    b.write(3, pattern(7, 3, 512) * 2)
    assert b.read(3, 2) == pattern(7, 3, 512) * 2
    b.close()
