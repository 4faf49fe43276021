"""The map cache (map.c) and the commit's map writes (commit.c).

The cache holds whole 4 KiB map pages, direct-mapped, written through. These tests pin
what it must never change: every read and every reopen sees exactly what a model of the
writes says, also where map pages share a cache slot and where a request crosses a page;
and they pin the backend writes a write costs, counted on a recording memory image.
"""
import random

import pytest

from btt_core import Btt

from conftest import MiB, mem_btt, pattern

BASE = 4096  # a BTT 1.1 starts 4 KiB into the namespace
WORDS = 1024  # map entries per 4 KiB map page


def map_writes(records, arena):
    """The backend writes that landed in the arena's map area."""
    lo = BASE + arena["start"] + arena["mapoff"]
    hi = lo + 4 * arena["external_nlba"]
    return [(off, data) for _, kind, off, data in records
            if kind == "write" and lo <= off < hi]


@pytest.mark.parametrize("durability", ["none", "group"])
def test_colliding_map_pages_read_back_a_model(durability):
    """More map pages than cache slots (512-byte sectors, 1,200 pages on one arena): pages
    i and i + 1024 share a slot, so one is cached and the other read and written around
    the cache, interleaved at every step."""
    io, b = mem_btt(size=600 * MiB, sector_size=512, durability=durability)
    ss, nlba = b.sector_size, b.nlba
    assert nlba > 1100 * WORDS
    rng = random.Random(7)
    model = {}
    hot = [p * WORDS + off for p in (3, 3 + 1024, 50, 50 + 1024) for off in (0, 17, WORDS - 1)]
    for step in range(600):
        lba = rng.choice(hot) if rng.random() < 0.7 else rng.randrange(nlba - 4)
        n = rng.randint(1, 3)
        n = min(n, nlba - lba)
        data = b"".join(pattern(step, lba + i, ss) for i in range(n))
        b.write(lba, data, fua=rng.random() < 0.05)
        for i in range(n):
            model[lba + i] = data[i * ss:(i + 1) * ss]
        probe = rng.choice(list(model))
        assert b.read(probe, 1) == model[probe]
    # A write across a map-page boundary, then a zero-flag run across another one.
    edge = 7 * WORDS - 2
    data = b"".join(pattern(9999, edge + i, ss) for i in range(4))
    b.write(edge, data)
    model.update({edge + i: data[i * ss:(i + 1) * ss] for i in range(4)})
    b.set_zero(9 * WORDS - 3, 6)
    model.update({9 * WORDS - 3 + i: bytes(ss) for i in range(6)})
    for lba, want in model.items():
        assert b.read(lba, 1) == want
    assert b.check()["clean"]
    b.close()
    b = Btt.open_io(io, durability="none")  # a fresh cache: the media must say the same
    for lba, want in model.items():
        assert b.read(lba, 1) == want
    assert b.check()["clean"]
    b.close()


def test_group_commit_writes_each_dirty_map_page_once():
    io, b = mem_btt(size=64 * MiB, durability="group")
    a = b.arenas[0]
    lbas = [5, 900, 17, 333, WORDS + 2, WORDS + 700, 3 * WORDS]  # pages 0, 0, 0, 0, 1, 1, 3
    io.set_recording(True)
    for i, lba in enumerate(lbas):
        b.write(lba, pattern(i, lba, 4096))
    b.flush()
    writes = map_writes(io.records(), a)
    assert len(writes) == 3
    # Page 0's write spans LBAs 5..900 and rewrites the words in between unchanged.
    assert writes[0][0] == BASE + a["start"] + a["mapoff"] + 4 * 5
    assert len(writes[0][1]) == 4 * (900 - 5 + 1)
    for i, lba in enumerate(lbas):
        assert b.read(lba, 1) == pattern(i, lba, 4096)
    assert b.read(6, 1) == bytes(4096)  # an untouched LBA inside the span
    b.close()
    b = Btt.open_io(io, durability="none")
    for i, lba in enumerate(lbas):
        assert b.read(lba, 1) == pattern(i, lba, 4096)
    assert b.check()["clean"]
    b.close()


@pytest.mark.parametrize("durability", ["none", "strict"])
def test_a_4k_write_is_three_backend_writes(durability):
    """Data, flog group, map word: the map word the write replaces comes from the cache."""
    io, b = mem_btt(size=32 * MiB, durability=durability)
    b.write(10, pattern(1, 10, 4096))
    io.set_recording(True)
    b.write(11, pattern(2, 11, 4096))
    recs = io.records()
    assert [kind for _, kind, _, _ in recs].count("write") == 3
    b.close()


def test_multi_sector_write_is_one_map_write():
    io, b = mem_btt(size=32 * MiB, durability="none")
    a = b.arenas[0]
    io.set_recording(True)
    b.write(100, b"".join(pattern(3, 100 + i, 4096) for i in range(32)))  # one 128 KiB request
    assert len(map_writes(io.records(), a)) == 1
    b.close()


def test_readonly_open_sees_the_media_through_the_cache():
    io, b = mem_btt(size=32 * MiB, durability="strict")
    b.write(3, pattern(1, 3, 4096))
    b.close()
    ro = Btt.open_io(io, readonly=True, durability="none")
    assert ro.read(3, 1) == pattern(1, 3, 4096)
    ro.close()


def test_map_pages_that_are_holes_are_not_read(tmp_path):
    """A fresh 64 GiB BTT on a sparse file: its map (16,000 pages, 1,024 cache slots) is one
    big hole, so random reads need no map read at all; a written page is read again, also
    after a reopen, and the entries around a written one stay identity (zeros)."""
    path = str(tmp_path / "big.img")
    b = Btt.create(path, size=64 << 30, durability="group")
    rng = random.Random(3)
    for _ in range(3000):
        assert b.read(rng.randrange(b.nlba), 1) == bytes(4096)
    assert b.stats()["map_reads"] == 0
    lbas = [5_000_000, 5_000_001, 9_000_000 + 7]
    for lba in lbas:
        b.write(lba, pattern(1, lba, 4096))
    b.flush()
    for lba in lbas:
        assert b.read(lba, 1) == pattern(1, lba, 4096)
        assert b.read(lba + 2, 1) == bytes(4096)
    b.close()
    b = Btt.open(path)
    for lba in lbas:
        assert b.read(lba, 1) == pattern(1, lba, 4096)
        assert b.read(lba + 2, 1) == bytes(4096)
    assert 0 < b.stats()["map_reads"] <= 2 * len(lbas)  # only the written pages
    assert b.check()["clean"]
    b.close()


def test_data_blocks_that_are_holes_are_not_read(tmp_path):
    """Unwritten LBAs of a fresh BTT on a sparse file map to data blocks that are holes:
    they read as zeros without a pread. A write ends the hole of the block it lands in (a
    free block, a hole too), so it reads back, while its unwritten neighbours in the same
    64 KiB still read zeros; rewrites reuse freed blocks; a reopen finds the holes again."""
    path = str(tmp_path / "sparse.img")
    b = Btt.create(path, size=256 << 20, durability="none")
    rng = random.Random(5)
    for lba in rng.sample(range(b.nlba), 500):
        assert b.read(lba, 1) == bytes(4096)
    assert b.stats()["hole_reads"] == 500
    written = {}
    for lba in rng.sample(range(b.nlba), 300):
        written[lba] = pattern(2, lba, 4096)
        b.write(lba, written[lba])
    for lba in list(written)[:100]:  # blocks freed by the first writes get reused
        written[lba] = pattern(3, lba, 8192)[:4096]
        b.write(lba, written[lba])
    for reopen in (False, True):
        if reopen:
            b.close()
            b = Btt.open(path)
        for lba, data in written.items():
            assert b.read(lba, 1) == data
            if lba + 1 not in written and lba + 1 < b.nlba:
                assert b.read(lba + 1, 1) == bytes(4096)
        for lba in list(written)[:50]:  # multi-sector runs across holes and data
            lo = max(lba - 3, 0)
            hi = min(lba + 4, b.nlba)
            assert b.read(lo, hi - lo) == b"".join(written.get(x, bytes(4096))
                                                   for x in range(lo, hi))
    assert b.check()["clean"]
    b.close()


def test_data_that_is_not_a_hole_is_read(tmp_path):
    """A data area that holds bytes (a file written before the BTT was made) is read as it
    is: unwritten LBAs return what their identity blocks hold, as on Linux."""
    path = str(tmp_path / "full.img")
    with open(path, "wb") as f:
        f.write(b"\xab" * (64 << 20))
    b = Btt.create(path, durability="none")
    holes_before = b.stats()["hole_reads"]
    assert b.read(b.nlba // 2, 1) == b"\xab" * 4096
    assert b.stats()["hole_reads"] == holes_before
    b.close()


@pytest.mark.parametrize("durability", ["none", "group"])
def test_consecutive_blocks_are_read_with_one_pread(tmp_path, durability):
    """A range written in one go lands mostly on consecutive blocks; reading it back gathers
    them into few preads, and a read across written, unwritten and zeroed sectors still
    returns each sector's own content."""
    path = str(tmp_path / "seq.img")
    with open(path, "wb") as f:
        f.write(b"\x5a" * (64 << 20))  # no holes: unwritten LBAs read their identity blocks
    b = Btt.create(path, durability=durability)
    data = b"".join(pattern(4, lba, 4096) for lba in range(100, 164))
    b.write(100, data)
    b.flush()
    before = b.stats()["data_reads"]
    assert b.read(100, 64) == data
    assert b.stats()["data_reads"] - before <= 4  # was 64: one per sector
    b.set_zero(120, 2)
    expect = (b"\x5a" * 4096 * 4 + data[:20 * 4096] + bytes(2 * 4096) + data[22 * 4096:]
              + b"\x5a" * 4096 * 4)
    assert b.read(96, 72) == expect
    b.close()
