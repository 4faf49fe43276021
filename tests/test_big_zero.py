"""TRIM and WRITE_ZEROES of any size (issue 16, item 4).

They carry no payload, so the 32 MiB maximum block size does not bound them: `blkdiscard`,
`fstrim` through nbd-client and `qemu-img` zero whole devices in one request. Raw exports
refused anything over 32 MiB with EINVAL. The server now zeroes in bounded chunks, one C
call each, so a forced disable can still stop a long zero between two chunks.
"""
import hashlib
import os
import shutil
import threading
import time

import pytest

from btt_core import Btt
from control.server import request

from conftest import MiB, pattern
from nbd_helpers import Server, connect

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e
SIZE = 192 * MiB
BS = 4096


def make_region(tmp_path, mode):
    path = str(tmp_path / "region.img")
    if mode == "sector":
        Btt.create(path, size=SIZE, sector_size=BS).close()
    else:  # a label-less file without a BTT: served raw
        with open(path, "wb") as f:
            f.truncate(SIZE)
    return path


MARKS = (0, 40 * MiB - BS, 40 * MiB, 150 * MiB - BS, 150 * MiB)  # around [40 MiB, 150 MiB)


def write_marks(h):
    size = h.get_size()
    for off in (*MARKS, size - BS):
        h.pwrite(pattern(1, off, BS), off)


@pytest.mark.parametrize("mode,params", [("raw", ()), ("sector", ()),
                                         ("sector", ("zero-flag=on",))])
def test_zero_and_trim_larger_than_the_maximum_block_size(tmp_path, mode, params):
    """A 110 MiB WRITE_ZEROES (also with NO_HOLE and FUA) zeroes exactly its range; then a
    whole-device TRIM, as blkdiscard sends, where the export offers TRIM."""
    region = make_region(tmp_path, mode)
    with Server(tmp_path, [region], *params) as s:
        h = connect(s)
        size = h.get_size()
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
        for flags in (0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA):
            write_marks(h)
            h.zero(110 * MiB, 40 * MiB, flags)
            assert h.pread(BS, 40 * MiB - BS) == pattern(1, 40 * MiB - BS, BS)
            assert h.pread(BS, 150 * MiB) == pattern(1, 150 * MiB, BS)
            assert h.pread(BS, 0) == pattern(1, 0, BS)
            assert h.pread(BS, size - BS) == pattern(1, size - BS, BS)
            for off in (40 * MiB, 100 * MiB, 150 * MiB - BS):
                assert h.pread(BS, off) == bytes(BS), off
        if h.can_trim():
            write_marks(h)
            h.trim(size, 0)
            for off in (*MARKS, size - BS):
                assert h.pread(BS, off) == bytes(BS), off
        else:
            assert mode == "sector" and not params  # TRIM needs zero-flag=on
            h.zero(size, 0)
            assert h.pread(BS, size - BS) == bytes(BS)
        h.shutdown()
    if mode == "sector":
        assert Btt.open(region, readonly=True).check()["clean"]


def test_no_hole_allocates_in_every_chunk(tmp_path):
    """NO_HOLE keeps its meaning over a range of many chunks: the zeros have storage."""
    region = make_region(tmp_path, "raw")
    with Server(tmp_path, [region]) as s:
        h = connect(s)
        h.zero(100 * MiB, 0, nbd.CMD_FLAG_NO_HOLE)
        h.shutdown()
    assert os.stat(region).st_blocks * 512 >= 100 * MiB


def test_misaligned_or_oversized_zero_touches_nothing(tmp_path):
    region = make_region(tmp_path, "raw")
    with Server(tmp_path, [region]) as s:
        h = connect(s, strict=False)
        write_marks(h)
        with pytest.raises(nbd.Error) as e:
            h.zero(100 * MiB + 512, 40 * MiB)
        assert e.value.errno == "EINVAL"  # libnbd names the errno
        assert h.pread(BS, 40 * MiB) == pattern(1, 40 * MiB, BS)
        h.shutdown()


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Each chunk is held up in a syscall (strace's fault injection), so that a 160 MiB zero
# takes seconds: raw zeroing is one fallocate per chunk; sector zeroing under strict
# durability one commit (two fdatasyncs) per chunk.
SLOW = {"raw": ("fallocate", ()),
        "sector": ("fdatasync,fsync", ("durability=strict",))}


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
@pytest.mark.parametrize("mode", ["raw", "sector"])
def test_forced_disable_stops_a_long_zero(tmp_path, mode):
    """Before, a raw zero this long was refused (EINVAL), and a sector one was one C call
    that the forced disable waited for to the end. Now the zero fails (ESHUTDOWN) between
    two chunks, and after the disable nothing more reaches the file."""
    region = make_region(tmp_path, mode)
    ctl = str(tmp_path / "nbd.ctl")
    calls, params = SLOW[mode]
    wrap = ("strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={calls}",
            "-e", f"inject={calls}:delay_exit=100000")
    with Server(tmp_path, [region], f"control={ctl}", *params, wrap=wrap) as s:
        h = connect(s)
        end = 10 * MiB + 160 * MiB
        h.pwrite(pattern(2, end - BS, BS), end - BS, nbd.CMD_FLAG_FUA)
        result = {}

        def zero():
            try:
                h.zero(160 * MiB, 10 * MiB)
                result["ok"] = True
            except nbd.Error as e:
                result["errno"] = e.errno

        t = threading.Thread(target=zero)
        t.start()
        time.sleep(1.0)  # well inside the zero: it takes 20 chunks of 100+ ms
        assert t.is_alive(), result
        reply = request(ctl, {"op": "disable-namespace", "namespace": "namespace0.0",
                              "force": True}, 30)
        assert reply["ok"], reply
        after = digest(region)
        t.join(30)
        assert result.get("errno") in ("ESHUTDOWN", "EIO"), result
        time.sleep(0.5)
        assert digest(region) == after  # nothing written after the disable returned
        h.shutdown()
        reply = request(ctl, {"op": "enable-namespace", "namespace": "namespace0.0"}, 30)
        assert reply["ok"], reply
        h = connect(s)
        assert h.pread(BS, end - BS) == pattern(2, end - BS, BS)  # stopped before the end
        assert h.pread(BS, 10 * MiB) == bytes(BS)  # and had begun
        h.shutdown()
