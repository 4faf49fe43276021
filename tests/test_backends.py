"""plugin/backends.py: the two ways a namespace is served, without nbdkit in between."""
import errno

import pytest

from btt_core import BttError
from plugin import backends
from plugin.backends import RawBackend, SectorBackend, _zero_in_chunks

from conftest import MiB, btt_file, pattern, sparse_file

BLOCK = 4096


def read(b, length, offset):
    buf = bytearray(length)
    b.pread(buf, offset)
    return bytes(buf)


@pytest.fixture
def raw_file(tmp_path):
    return sparse_file(tmp_path / "raw.img", 16 * MiB)


@pytest.fixture
def btt_region(tmp_path):
    return btt_file(tmp_path / "btt.img", 32 * MiB)


def test_zero_in_chunks_splits_and_puts_fua_on_the_last_piece(monkeypatch):
    monkeypatch.setattr(backends, "ZERO_CHUNK", 3 * BLOCK)
    calls = []
    _zero_in_chunks(lambda off, n, fua: calls.append((off, n, fua)), BLOCK, 7 * BLOCK,
                    size=16 * BLOCK, block=BLOCK, fua=True)
    assert calls == [(BLOCK, 3 * BLOCK, False), (4 * BLOCK, 3 * BLOCK, False),
                     (7 * BLOCK, BLOCK, True)]
    calls.clear()
    _zero_in_chunks(lambda off, n, fua: calls.append((off, n, fua)), 0, 2 * BLOCK,
                    size=16 * BLOCK, block=BLOCK, fua=False)
    assert calls == [(0, 2 * BLOCK, False)]


@pytest.mark.parametrize("offset,count", [(1, BLOCK), (0, BLOCK + 512), (15 * BLOCK, 2 * BLOCK),
                                          (17 * BLOCK, BLOCK)])
def test_a_refused_zero_touches_nothing(offset, count):
    calls = []
    with pytest.raises(BttError) as e:
        _zero_in_chunks(lambda *a: calls.append(a), offset, count, size=16 * BLOCK,
                        block=BLOCK, fua=False)
    assert e.value.errno == errno.EINVAL and calls == []


def test_raw_backend_serves_its_extent_of_the_file(raw_file):
    b = RawBackend(raw_file, offset=4 * MiB, size=8 * MiB, readonly=False)
    assert (b.mode, b.size, b.sector_size) == ("raw", 8 * MiB, 4096)
    b.pwrite(pattern(1, 0, BLOCK), 0)
    b.flush()
    with open(raw_file, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(BLOCK) == pattern(1, 0, BLOCK)  # the extent starts at its offset
    assert read(b, BLOCK, 0) == pattern(1, 0, BLOCK)
    b.zero(0, BLOCK, may_trim=True, fua=True)
    assert read(b, BLOCK, 0) == bytes(BLOCK)
    with pytest.raises(OSError) as e:
        b.pwrite(bytes(BLOCK), 8 * MiB)  # past the extent, where the next namespace lives
    assert e.value.errno == errno.EINVAL
    b.close()
    with pytest.raises(OSError) as e:
        read(b, BLOCK, 0)
    assert e.value.errno == errno.ESHUTDOWN


def test_raw_backend_read_only(raw_file):
    b = RawBackend(raw_file, offset=0, size=16 * MiB, readonly=True)
    with pytest.raises(OSError) as e:
        b.pwrite(bytes(BLOCK), 0)
    assert e.value.errno in (errno.EROFS, errno.EPERM, errno.EBADF)
    b.close()


@pytest.mark.parametrize("zero_flag", [False, True])
def test_sector_backend_zeroes_by_flag_or_by_writing(btt_region, zero_flag):
    b = SectorBackend(btt_region, offset=0, size=None, readonly=False, durability="strict",
                      zero_flag=zero_flag, commit_ms=0)
    assert (b.mode, b.sector_size) == ("sector", 4096)
    for lba in range(4):
        b.pwrite(pattern(2, lba, BLOCK), lba * BLOCK)
    # Only Z flags (zero-flag=on with trimming allowed) make a zero fast.
    assert b.zero_is_fast(True) is zero_flag and b.zero_is_fast(False) is False
    b.zero(BLOCK, 2 * BLOCK, may_trim=True, fua=True)
    assert read(b, 4 * BLOCK, 0) == (pattern(2, 0, BLOCK) + bytes(2 * BLOCK)
                                     + pattern(2, 3, BLOCK))
    holes = [e for e in b.block_status(0, 4 * BLOCK) if e[2]]
    assert bool(holes) is zero_flag  # Z entries read as holes; written zeros are data
    b.close()


def test_raw_zero_after_close_is_refused(tmp_path):
    path = str(tmp_path / "raw.img")
    with open(path, "wb") as f:
        f.write(b"\xab" * (1 * MiB))
    b = RawBackend(path, 0, 1 * MiB, readonly=False)
    b.close()
    with pytest.raises(OSError) as e:
        b.zero(0, 4096, True, False)
    assert e.value.errno == errno.ESHUTDOWN
    with open(path, "rb") as f:
        assert f.read(4096) == b"\xab" * 4096
