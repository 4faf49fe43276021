"""Raw exports through C (btt_core/rawio.c): alignment, bounds, read-only, zeroing, and no
write reaching the file once close() has returned."""
import errno
import os
import threading

import pytest

from btt_core import BttError
from btt_core.raw import RawExport

from conftest import MiB, pattern, sparse_file

OFFSET, SIZE = 1 * MiB, 8 * MiB + 100  # a namespace inside the file, with a ragged tail


@pytest.fixture
def region(tmp_path):
    return sparse_file(tmp_path / "region.img", 16 * MiB)


def test_reads_and_writes_land_at_the_namespace_offset(region):
    r = RawExport(region, OFFSET, SIZE, 4096, readonly=False)
    assert r.size == 8 * MiB  # the ragged tail is not exported
    r.pwrite(pattern(1, 3, 4096), 3 * 4096)
    buf = bytearray(2 * 4096)
    r.pread(buf, 3 * 4096)
    assert bytes(buf) == pattern(1, 3, 4096) + bytes(4096)
    r.close()
    with open(region, "rb") as f:
        f.seek(OFFSET + 3 * 4096)
        assert f.read(4096) == pattern(1, 3, 4096)


@pytest.mark.parametrize("offset, length, what", [
    (512, 4096, "not aligned"), (0, 4096 + 512, "not aligned"),
    (8 * MiB, 4096, "beyond"), (8 * MiB - 4096, 8192, "beyond")])
def test_misaligned_and_out_of_range_requests_are_refused(region, offset, length, what):
    r = RawExport(region, OFFSET, SIZE, 4096, readonly=False)
    with pytest.raises(BttError) as e:
        r.pwrite(bytes(length), offset)
    assert e.value.errno == errno.EINVAL and what in str(e.value)
    with pytest.raises(BttError) as e:
        r.pread(bytearray(length), offset)
    assert e.value.errno == errno.EINVAL


def test_read_only_export_refuses_writes_and_zeroes(region):
    r = RawExport(region, OFFSET, SIZE, 512, readonly=True)
    with pytest.raises(BttError) as e:
        r.pwrite(bytes(512), 0)
    assert e.value.errno == errno.EROFS
    with pytest.raises(BttError) as e:
        r.zero(0, 512)
    assert e.value.errno == errno.EROFS
    r.flush()  # nothing to sync, no error


def test_zero_punches_a_hole_and_allocate_fills_it(region):
    r = RawExport(region, 0, 16 * MiB, 4096, readonly=False)
    r.pwrite(b"\xff" * MiB, 0)
    r.flush()
    allocated = os.stat(region).st_blocks
    r.zero(0, MiB)
    assert os.stat(region).st_blocks < allocated  # a hole, not written zeros
    r.zero(0, MiB, allocate=True, fua=True)
    assert os.stat(region).st_blocks >= allocated
    buf = bytearray(MiB)
    r.pread(buf, 0)
    assert not any(buf)


def test_bad_geometry_is_refused(region):
    with pytest.raises(BttError) as e:
        RawExport(region, 0, 16 * MiB, 3000, readonly=False)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(BttError) as e:
        RawExport(region, 8 * MiB, 16 * MiB, 4096, readonly=False)
    assert e.value.errno == errno.EINVAL and "beyond the end" in str(e.value)


def _close_under_a_writer(region):
    """Closes the export while a writer keeps rewriting all of it with alternating
    content; returns (file content when close() returned, content after the writer
    stopped, the writer's errnos)."""
    r = RawExport(region, OFFSET, SIZE, 4096, readonly=False)
    blocks = [bytes([v]) * r.size for v in (0xAA, 0x55)]
    started, errors = threading.Event(), []

    def writer():
        i = 0
        while True:
            try:
                r.pwrite(blocks[i % 2], 0)
            except BttError as e:
                errors.append(e.errno)
                return
            i += 1
            started.set()

    t = threading.Thread(target=writer)
    t.start()
    started.wait(10)
    r.close()
    with open(region, "rb") as f:
        f.seek(OFFSET)
        at_close = f.read(r.size)
    t.join(10)
    with open(region, "rb") as f:
        f.seek(OFFSET)
        after = f.read(r.size)
    with pytest.raises(BttError) as e:
        r.pread(bytearray(4096), 0)
    assert e.value.errno == errno.ESHUTDOWN
    r.close()  # a second close is harmless
    return at_close, after, errors


def test_no_write_reaches_the_file_after_close(region):
    """Once close() has returned the file must not change. The old raw path (a dup2 of
    /dev/null over the descriptor) let a write already inside pwrite land afterwards in
    about half of these trials."""
    for _ in range(8):
        at_close, after, errors = _close_under_a_writer(region)
        assert after == at_close
        assert errors == [errno.ESHUTDOWN]
