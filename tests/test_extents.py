"""Block status (NBD base:allocation) in process: the engine (extents.c) and raw
exports (rawio.c). A hole is claimed only where a read returns zeros — a copy that skips it
loses nothing — and exactly where the map's Z flag says so; staged writes are data; the
answer is contiguous from the offset asked, may stop short at its extent cap, and over a
sparse terabyte costs what the data written costs, not what the size does."""
import errno
import random
import threading
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from btt_core import Btt, BttError, Io
from btt_core._lib import lib
from btt_core.raw import RawExport

from conftest import MiB, mem_btt, pattern, sparse_file
from testbuild import commit_step, set_map_flags

HOLE = lib.BTT_EXTENT_HOLE
assert HOLE == 3  # NBD_STATE_HOLE | NBD_STATE_ZERO, passed through to nbdkit as it is


def check_shape(ext, offset, length, max_extents):
    """Contiguous from offset, inside the request, at most max_extents; complete unless the
    cap was reached."""
    assert ext and ext[0][0] == offset
    assert len(ext) <= max_extents
    pos = offset
    for off, n, kind in ext:
        assert off == pos and n > 0 and kind in (0, HOLE)
        pos += n
    assert pos <= offset + length
    if len(ext) < max_extents:
        assert pos == offset + length
    for (_, _, k1), (_, _, k2) in zip(ext, ext[1:], strict=False):
        assert k1 != k2  # neighbours of one type are merged


def sector_types(b, ext):
    """{lba: type} for every whole sector the extents cover."""
    ss, out = b.sector_size, {}
    for off, n, kind in ext:
        for lba in range(off // ss, (off + n) // ss):
            out[lba] = kind
    return out


def holes_read_zero(read, ext):
    for off, n, kind in ext:
        if kind == HOLE:
            data = read(off, n)
            assert not any(data), f"hole [{off}, +{n}) reads non-zero"


def btt_reader(b):
    """read(offset, length) of any range: pread takes whole sectors, at most 32 MiB."""
    ss = b.sector_size

    def read(off, n):
        lo, hi = off // ss * ss, -(-(off + n) // ss) * ss
        buf = bytearray(hi - lo)
        for k in range(0, hi - lo, 8 * MiB):
            b.pread(memoryview(buf)[k:k + 8 * MiB], lo + k)
        return buf[off - lo:off - lo + n]
    return read


def full_map(status, size, max_extents=1024):
    """The whole range, asking again from where each partial answer ends, as clients do."""
    out, pos = [], 0
    while pos < size:
        ext = status(pos, size - pos, max_extents)
        check_shape(ext, pos, size - pos, max_extents)
        out += ext
        pos = ext[-1][0] + ext[-1][1]
    return out


# ---- the engine -------------------------------------------------------------------------

@pytest.mark.parametrize("sector_size", [512, 4096])
def test_a_fresh_namespace_is_one_hole(sector_size):
    _, b = mem_btt(size=40 * MiB, sector_size=sector_size, arena_max=16 * MiB)
    assert len(b.arenas) == 2
    assert b.block_status(0, b.size) == [(0, b.size, HOLE)]
    assert b.block_status(4096, 8192, 1) == [(4096, 8192, HOLE)]
    # Writing and zeroing are data; a Z entry is a hole again.
    b.write(3, pattern(1, 3, sector_size))
    b.write_zeroes(10, 2)
    b.set_zero(20, 5)
    t = sector_types(b, b.block_status(0, b.size))
    assert t[3] == 0 and t[10] == t[11] == 0 and t[1000] == HOLE  # an untouched 64 KiB unit
    assert all(t[lba] == HOLE for lba in range(20, 25))
    b.close()


OPS = st.lists(st.tuples(st.sampled_from(["write", "write_zeroes", "set_zero", "flush",
                                          "write_zero_data"]),
                         st.integers(0, 10**9), st.integers(1, 40)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sector_size=st.sampled_from([512, 4096]), durability=st.sampled_from(["group", "none"]),
       ops=OPS, probes=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 10**9),
                                          st.integers(1, 6)), max_size=6),
       reopen=st.booleans(),
       garbage=st.lists(st.tuples(st.integers(0, 36 * MiB - 1), st.integers(1, 200_000)),
                        max_size=4))
def test_block_status_agrees_with_reads(sector_size, durability, ops, probes, reopen,
                                        garbage):
    """Random writes, zeroes and Z-flag zeroing (group mode: mostly still staged when asked)
    over two arenas: every hole reads zeros, every sector holding non-zero data is data,
    every Z sector not written since is a hole; partial answers (small caps, unaligned
    offsets) keep the same shape. The same after a reopen (the holes found again). Bytes
    left in the file before the format (`garbage`) are what unwritten sectors read, as on
    Linux: data, never holes."""
    io = Io.memory(36 * MiB)
    for off, n in garbage:
        io.write(off, bytes([0xA5]) * min(n, 36 * MiB - off))
    Btt.format_io(io, sector_size=sector_size, arena_max=16 * MiB)
    b = Btt.open_io(io, durability=durability)
    ss, nlba, model = b.sector_size, b.nlba, {}
    # Most ops near arena 1's start, to cross the arena boundary and share map pages.
    base = b.arenas[1]["lba_start"] - 64
    for kind, where, n in ops:
        lba = (base + where % 256) if where % 3 else where % nlba
        n = min(n, nlba - lba)
        if kind == "write":
            b.write(lba, b"".join(pattern(where, lba + i, ss) for i in range(n)))
            model.update({lba + i: "data" for i in range(n)})
        elif kind == "write_zero_data":
            b.write(lba, bytes(n * ss))
            model.update({lba + i: "zeros" for i in range(n)})
        elif kind == "write_zeroes":
            b.write_zeroes(lba, n)
            model.update({lba + i: "zeros" for i in range(n)})
        elif kind == "set_zero":
            b.set_zero(lba, n)
            model.update({lba + i: "Z" for i in range(n)})
        else:
            b.flush()
    if reopen:
        b.close()
        b = Btt.open_io(io, durability=durability)
    read = btt_reader(b)
    ext = full_map(b.block_status, b.size)
    holes_read_zero(read, ext)
    t = sector_types(b, ext)
    for lba, kind in model.items():
        if kind == "data":
            assert t[lba] == 0, f"LBA {lba} holds data but is reported as a hole"
        elif kind == "Z":
            assert t[lba] == HOLE, f"LBA {lba} has the Z flag but is reported as data"
    for where, length, cap in probes:
        off = where % b.size
        length = 1 + length % (b.size - off)
        got = b.block_status(off, length, cap)
        check_shape(got, off, length, cap)
        holes_read_zero(read, got)
        for o, n, kind in got:  # the same verdict as the whole map, sector by sector
            for lba in range(o // ss, (o + n - 1) // ss + 1):
                assert t[lba] == kind
    b.close()


@pytest.mark.testbuild
def test_staged_writes_are_data_while_a_commit_runs():
    """Group mode: a write lives in the stage tables until its commit writes its map word.
    Block status must see it there, in the filling epoch and in the one being committed,
    at every step of the commit."""
    _, b = mem_btt(size=32 * MiB, durability="group")
    b.write(5, pattern(1, 5, 4096))

    def kinds():
        t = sector_types(b, b.block_status(0, 16 * 4096))
        return t[5], t[6], t[7]

    assert kinds() == (0, HOLE, HOLE)
    assert commit_step(b)  # takes the epoch holding LBA 5
    b.write(6, pattern(1, 6, 4096))  # staged in the next epoch meanwhile
    while commit_step(b):
        assert kinds() == (0, 0, HOLE)
    assert kinds() == (0, 0, HOLE)
    b.flush()
    assert kinds() == (0, 0, HOLE)
    b.close()


def test_acknowledged_writes_are_data_under_concurrent_commits():
    """Writers in group mode with a 1 ms commit timer and slow syncs, so commits retire
    entries from the stage tables while block status runs: a write that has returned is
    never reported as a hole, and a Z-zeroing that has returned always is."""
    io, b = mem_btt(size=64 * MiB, durability="group")
    io.set_sync_delay(300)
    b.start_timer(1)
    failures, stop = [], time.monotonic() + 3

    def writer(k):
        rng = random.Random(k)
        lbas = list(range(k * 2000, k * 2000 + 2000))
        while time.monotonic() < stop and not failures:
            lba = rng.choice(lbas)
            if rng.random() < 0.8:
                b.write(lba, pattern(k, lba, 4096))
                want = 0
            else:
                b.set_zero(lba, 1)
                want = HOLE
            got = b.block_status(lba * 4096, 4096)
            if got != [(lba * 4096, 4096, want)]:
                failures.append((lba, want, got))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert b.stats()["commits"] > 10
    b.close()


@pytest.mark.testbuild
def test_media_errors_are_data_and_bad_requests_are_refused():
    _, b = mem_btt(size=32 * MiB)
    set_map_flags(b, 7, 0x40000000)  # E: reads fail with EIO, not zeros
    assert sector_types(b, b.block_status(0, 8 * 4096))[7] == 0
    for off, n, cap in [(0, 0, 1), (0, 4096, 0), (b.size, 4096, 1), (b.size - 4096, 8192, 1)]:
        with pytest.raises(BttError) as e:
            b.block_status(off, n, cap)
        assert e.value.errno == errno.EINVAL
    b.close()
    with pytest.raises(BttError) as e:  # a forced disable: late callers are refused
        b.block_status(0, 4096)
    assert e.value.errno == errno.ESHUTDOWN


def test_a_sparse_terabyte_answers_fast(tmp_path):
    """1 TiB with a few MiB written here and there: the whole range in one request costs a
    scan of the hole bitmaps (~34 MiB of bits), not 2^28 map lookups. A complexity check
    with a generous bound, not a benchmark."""
    path = str(tmp_path / "tib.img")
    b = Btt.create(path, size=1 << 40, durability="none")
    rng = random.Random(1)
    spots = sorted(rng.randrange(b.nlba - 64) for _ in range(200))
    for lba in spots:
        b.write(lba, b"".join(pattern(2, lba + i, 4096) for i in range(4)))
    b.set_zero(spots[10], 4)
    t = time.perf_counter()
    ext = b.block_status(0, b.size, 4096)
    elapsed = time.perf_counter() - t
    assert elapsed < 2, f"{elapsed:.2f} s for a 1 TiB extents request"
    check_shape(ext, 0, b.size, 4096)
    assert sum(n for _, n, _ in ext) == b.size

    def kind_of(lba):
        return next(k for off, n, k in ext if off <= lba * 4096 < off + n)

    zeroed = spots[10]
    for lba in spots:
        if not zeroed - 3 <= lba <= zeroed + 3:
            assert kind_of(lba) == 0
    assert all(kind_of(zeroed + i) == HOLE for i in range(4))
    data = sum(n for _, n, kind in ext if kind == 0)
    assert data < 200 * (1 << 20)  # written data plus neighbours in their 64 KiB units
    b.close()
    b = Btt.open(path, durability="none")  # reopened: the same from the file's holes
    t = time.perf_counter()
    assert b.block_status(0, b.size, 4096) == ext
    assert time.perf_counter() - t < 2
    b.close()


# ---- raw exports ------------------------------------------------------------------------

@pytest.fixture
def raw_file(tmp_path):
    return sparse_file(tmp_path / "raw.img", 16 * MiB)


def test_raw_block_status_follows_the_file(raw_file):
    """Holes of the region file within the namespace's extent (it starts 1 MiB in), in
    whole 4096-byte blocks; punched zeroes are holes, allocated zeros read as zeros."""
    r = RawExport(raw_file, MiB, 8 * MiB, 4096, readonly=False)
    assert r.block_status(0, r.size) == [(0, r.size, HOLE)]
    r.pwrite(pattern(1, 0, 8192), 64 * 1024)
    r.pwrite(pattern(1, 1, 4096), r.size - 4096)
    with open(raw_file, "r+b") as f:  # data outside the namespace does not count
        f.seek(MiB - 4096)
        f.write(b"x" * 4096)
        f.seek(MiB + 8 * MiB)
        f.write(b"y" * 4096)
    ext = r.block_status(0, r.size)
    assert ext == [(0, 65536, HOLE), (65536, 8192, 0), (73728, r.size - 73728 - 4096, HOLE),
                   (r.size - 4096, 4096, 0)]
    r.zero(65536, 4096)  # punched
    assert r.block_status(65536, 8192) == [(65536, 4096, HOLE), (69632, 4096, 0)]
    assert r.block_status(65536 + 100, 8192, 1) == [(65636, 3996, HOLE)]
    assert r.block_status(0, r.size, 2) == [(0, 69632, HOLE), (69632, 4096, 0)]
    r.close()
    with pytest.raises(BttError) as e:
        r.block_status(0, 4096)
    assert e.value.errno == errno.ESHUTDOWN


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "zero", "allocate"]),
                              st.integers(0, 511), st.integers(1, 24)), max_size=25),
       block=st.sampled_from([512, 4096]))
def test_raw_block_status_agrees_with_reads(tmp_path_factory, ops, block):
    path = str(tmp_path_factory.mktemp("raw") / "raw.img")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    r = RawExport(path, 4096, 2 * MiB + 4096, block, readonly=False)
    model = {}
    for kind, blk, n in ops:
        off, length = blk * 4096, min(n * 4096, r.size - blk * 4096)
        if kind == "write":
            r.pwrite(pattern(blk, n, length), off)
            model.update({b: "data" for b in range(blk, blk + length // 4096)})
        else:
            r.zero(off, length, allocate=kind == "allocate")
            model.update({b: "Z" if kind == "zero" else "zeros"
                          for b in range(blk, blk + length // 4096)})

    def read(off, n):
        buf = bytearray(n)
        r.pread(buf, off)
        return buf

    ext = full_map(r.block_status, r.size, 7)
    holes_read_zero(read, ext)
    for off, n, kind in ext:
        assert off % block == 0 and n % block == 0
        for b in range(off // 4096, (off + n) // 4096):
            want = {"data": 0, "Z": HOLE}.get(model.get(b, "Z"))
            assert want is None or kind == want, (b, model.get(b), kind)
    r.close()


def test_raw_sparse_terabyte(tmp_path):
    path = str(tmp_path / "raw-tib.img")
    with open(path, "wb") as f:
        f.truncate((1 << 40) + MiB)
    r = RawExport(path, MiB, 1 << 40, 4096, readonly=False)
    for k in range(100):
        r.pwrite(pattern(k, k, 4096), k * (1 << 33))
    t = time.perf_counter()
    ext = r.block_status(0, r.size)
    assert time.perf_counter() - t < 2
    assert len(ext) == 200 and sum(n for _, n, k in ext if k == 0) == 100 * 4096
    r.close()
