"""Process-crash safety (intent journal) and error handling (btt-format.md §7.4, serving.md)."""
import errno
import os
import signal
import subprocess
import sys

import pytest

from btt_core import Btt, BttError, Io, boot_id

from conftest import MiB, mem_btt, pattern
from testbuild import set_map_flags


def group_btt():
    io, journal = Io.memory(32 * MiB), Io.memory(1 << 20)
    Btt.format_io(io, size=32 * MiB)
    return io, journal, Btt.open_io(io, durability="group", journal=journal)


def test_journal_replays_acknowledged_writes_after_a_process_crash():
    io, journal, b = group_btt()
    for lba in range(10):
        b.write(lba, pattern(1, lba, 4096))
    b.abandon()  # kill -9: staged flog/map updates die with the process
    b = Btt.open_io(io, durability="group", journal=journal)
    assert b.stats()["journal_replayed"] == 10
    assert b.read(0, 10) == b"".join(pattern(1, lba, 4096) for lba in range(10))
    assert b.check()["clean"]
    b.close()


def test_without_the_journal_a_crash_loses_staged_writes():
    """Shows the journal is what saves them (the test above could not pass without it)."""
    io = Io.memory(32 * MiB)
    Btt.format_io(io, size=32 * MiB)
    b = Btt.open_io(io, durability="group", journal=None)
    before = b.read(3, 1)
    b.write(3, pattern(1, 3, 4096))
    b.abandon()
    b = Btt.open_io(io, durability="group")
    assert b.read(3, 1) == before
    b.close()


def test_journal_from_another_boot_is_ignored():
    io, journal, b = group_btt()
    before = b.read(4, 1)
    b.write(4, pattern(1, 4, 4096))
    b.abandon()
    other_boot = bytes(reversed(boot_id())) if any(boot_id()) else b"\x01" * 16
    b = Btt.open_io(io, durability="group", journal=journal, boot=other_boot)
    assert b.stats()["journal_replayed"] == 0
    assert b.read(4, 1) == before  # power loss: an unflushed write may be lost, never torn
    assert b.check()["clean"]
    b.close()


def test_journal_entry_whose_data_never_landed_is_skipped():
    io, journal, b = group_btt()
    b.write(5, pattern(1, 5, 4096))
    b.write(6, pattern(1, 6, 4096))
    free_block = b.arenas[0]["external_nlba"]  # lane 0's block, holding LBA 5's new data
    b.abandon()
    io.poke(4096 + 4096 + free_block * 4096, b"\0" * 4096)  # as if the data write was lost
    b = Btt.open_io(io, durability="group", journal=journal)
    assert b.stats()["journal_replayed"] == 1
    assert b.read(6, 1) == pattern(1, 6, 4096)
    assert b.read(5, 1) != pattern(1, 5, 4096)
    assert b.check()["clean"]
    b.close()


def test_kill_minus_9_of_a_real_process_loses_nothing(tmp_path):
    path = str(tmp_path / "r.img")
    Btt.create(path, size=64 * MiB).close()
    code = f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from btt_core import Btt
from conftest import pattern
b = Btt.open({path!r}, durability="group")
for lba in range(300):
    b.write(lba, pattern(2, lba, 4096))
print("acked", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip() == "acked" and p.returncode == -signal.SIGKILL
    assert os.path.exists(path + ".journal")
    with Btt.open(path) as b:
        assert b.read(0, 300) == b"".join(pattern(2, lba, 4096) for lba in range(300))
        assert b.check()["clean"]
    assert not os.path.exists(path + ".journal")  # a clean close leaves no journal


@pytest.mark.testbuild
def test_error_entry_reads_eio_until_rewritten():
    io, b = mem_btt(durability="strict")
    b.write(7, pattern(1, 7, 4096))
    set_map_flags(b, 7, 0x40000000)
    with pytest.raises(BttError) as e:
        b.read(7, 1)
    assert e.value.errno == errno.EIO and "media error" in str(e.value)
    with pytest.raises(BttError):
        b.read(6, 3)  # a run containing it fails too
    assert b.read(6, 1) == bytes(4096)  # its neighbour, never written, still reads
    b.write(7, pattern(2, 7, 4096))
    assert b.read(7, 1) == pattern(2, 7, 4096)
    r = b.check()
    assert r["clean"] and r["error_entries"] == 0
    b.close()


@pytest.mark.testbuild
def test_zero_entry_reads_zeros_for_every_sector_of_a_run():
    """Unlike Linux (§10.1), a Z entry in the middle does not cut the run short."""
    io, b = mem_btt(sector_size=512, durability="strict")
    data = b"".join(pattern(1, lba, 512) for lba in range(8))
    b.write(0, data)
    set_map_flags(b, 3, 0x80000000)
    got = b.read(0, 8)
    assert got[3 * 512:4 * 512] == bytes(512)
    assert got[:3 * 512] == data[:3 * 512] and got[4 * 512:] == data[4 * 512:]
    b.write(3, pattern(2, 3, 512))
    assert b.read(3, 1) == pattern(2, 3, 512)
    assert b.check()["clean"]
    b.close()


def test_arena_error_flag_makes_writes_erofs(tmpfile):
    Btt.create(tmpfile, size=32 * MiB).close()
    with Btt.open(tmpfile) as b:
        b.write(0, pattern(1, 0, 4096))
    with open(tmpfile, "r+b") as f:
        f.seek(4096)
        block = bytearray(f.read(4096))
    from btt_core import pack_info, unpack_info
    fields = unpack_info(bytes(block))
    fields["flags"] = 1
    for k in ("checksum_ok",):
        fields.pop(k)
    with open(tmpfile, "r+b") as f:
        f.seek(4096)
        f.write(pack_info(fields))
    with Btt.open(tmpfile) as b:
        assert b.read(0, 1) == pattern(1, 0, 4096)  # reads still work
        with pytest.raises(BttError) as e:
            b.write(0, bytes(4096))
        assert e.value.errno == errno.EROFS


def test_readonly_refuses_writes(tmpfile):
    Btt.create(tmpfile, size=32 * MiB).close()
    with Btt.open(tmpfile, readonly=True) as b:
        with pytest.raises(BttError) as e:
            b.write(0, bytes(4096))
        assert e.value.errno == errno.EROFS


def test_out_of_range_requests():
    io, b = mem_btt()
    for lba, n in [(b.nlba, 1), (b.nlba - 1, 2), (2**64 - 1, 2), (2**63, 2**63)]:
        with pytest.raises(BttError) as e:
            b.readinto(lba, bytearray(4096 * min(n, 2))) if n <= 2 else b.read(lba, 0)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(BttError):
            b.write(lba, bytes(4096 * min(n, 2)))
    with pytest.raises(OverflowError):
        b.read(-1, 1)
    assert b.read(b.nlba - 1, 1) is not None and b.read(0, 0) == b""
    assert b.check()["clean"]
    b.close()


def test_misaligned_buffer_refused():
    io, b = mem_btt()
    with pytest.raises(BttError) as e:
        b.write(0, bytes(1000))
    assert e.value.errno == errno.EINVAL
    b.close()


def test_failed_fdatasync_is_never_treated_as_success():
    io, journal, b = group_btt()
    b.write(1, pattern(1, 1, 4096))
    io.fail_sync(errno.EIO)
    with pytest.raises(BttError) as e:
        b.flush()
    assert e.value.errno == errno.EIO
    io.fail_sync(0)  # the disk "recovers": the earlier failure must still be reported
    with pytest.raises(BttError):
        b.flush()
    with pytest.raises(BttError):
        b.write(2, pattern(1, 2, 4096))
    assert b.read(1, 1) == pattern(1, 1, 4096)  # reads keep working
    b.abandon()
    b = Btt.open_io(io, durability="group", journal=journal)
    assert b.check()["clean"]
    b.close()


def test_enospc_on_a_full_backing_store(tiny_fs):
    """A sparse region on a tiny tmpfs: data writes fail ENOSPC, the BTT stays usable."""
    path = str(tiny_fs / "r.img")
    b = Btt.create(path, size=64 * MiB, durability="strict")
    with pytest.raises(BttError) as e:
        for lba in range(0, 2000):
            b.write(lba, pattern(1, lba, 4096))
    assert e.value.errno == errno.ENOSPC
    failed_at = lba
    assert b.read(0, 1) == pattern(1, 0, 4096)
    assert b.check()["clean"]
    b.close()
    b = Btt.open(path, durability="strict", readonly=True)
    assert b.read(failed_at - 1, 1) == pattern(1, failed_at - 1, 4096)
    assert b.check()["clean"]
    b.close()


@pytest.mark.parametrize("durability", ["group", "strict", "none"])
def test_zero_flag_extension(durability):
    io, b = mem_btt(size=40 * MiB, arena_max=16 * MiB, durability=durability)
    edge = b.arenas[1]["lba_start"]
    data = b"".join(pattern(1, lba, 4096) for lba in range(edge - 5, edge + 5))
    b.write(edge - 5, data)
    b.set_zero(edge - 3, 6)  # crosses the arena boundary
    got = b.read(edge - 5, 10)
    assert got[:2 * 4096] == data[:2 * 4096] and got[8 * 4096:] == data[8 * 4096:]
    assert got[2 * 4096:8 * 4096] == bytes(6 * 4096)
    r = b.check()
    assert r["clean"] and r["zero_entries"] == 6
    b.write(edge - 2, pattern(2, edge - 2, 4096))  # a Z entry's block is the old block
    assert b.read(edge - 2, 1) == pattern(2, edge - 2, 4096)
    assert b.check()["clean"]
    b.close()
    b = Btt.open_io(io, durability="none")
    assert b.read(edge - 3, 1) == bytes(4096) and b.read(edge - 2, 1) == pattern(2, edge - 2, 4096)
    b.close()
