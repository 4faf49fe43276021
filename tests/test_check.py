"""check-namespace and read-infoblock: ndctl's btt-check.sh, btt-errors.sh and
btt-pad-compat.sh scenarios (namespace-model.md §4.5), for every sector size."""
import errno
import struct

import pytest

from btt_core import SECTOR_SIZES, Btt, BttError, check_namespace, read_infoblock

from conftest import GiB, MiB, pattern
from testbuild import set_map_flags

SIZE = 48 * MiB


def make(path, lbasize=4096, version="1.1", size=SIZE, writes=50):
    with Btt.create(path, size=size, sector_size=lbasize, version=version,
                    durability="strict") as b:
        for i in range(writes):
            b.write(i * 7 % b.nlba, pattern(i, i * 7 % b.nlba, b.sector_size))
        return b.arenas, b.nlba, b.sector_size


def poke(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def peek(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def problems(report):
    return sorted({f["problem"] for f in report["findings"] if f["severity"] == "error"})


@pytest.mark.parametrize("lbasize", SECTOR_SIZES)
def test_clean_namespace_checks_clean_for_every_sector_size(tmpfile, lbasize):
    arenas, nlba, ss = make(tmpfile, lbasize)
    r = check_namespace(tmpfile)
    assert r["status"] == 0 and r["errors"] == 0, r["findings"]
    assert r["sector_size"] == lbasize and r["nlba"] == nlba


@pytest.mark.parametrize("lbasize", [512, 4104])
def test_wiped_info_block_restored_from_backup(tmpfile, lbasize):
    import inject
    arenas, nlba, ss = make(tmpfile, lbasize)
    inject.wipe_info(tmpfile, which="primary")
    with pytest.raises(BttError) as e:
        Btt.open(tmpfile)
    assert e.value.errno == errno.ENODEV
    r = check_namespace(tmpfile)
    assert r["status"] == 1 and problems(r) == ["info-primary"]
    r = check_namespace(tmpfile, repair=True)
    assert r["status"] == 2
    assert check_namespace(tmpfile)["status"] == 0
    with Btt.open(tmpfile) as b:
        assert b.read(7, 1) == pattern(1, 7, ss)


def test_both_info_blocks_wiped_means_no_btt(tmpfile):
    import inject
    make(tmpfile)
    inject.wipe_info(tmpfile, which="both")
    with pytest.raises(BttError) as e:
        check_namespace(tmpfile, repair=True)
    assert e.value.errno == errno.ENODEV and "no BTT found" in str(e.value)


def test_damaged_backup_rewritten_from_primary(tmpfile):
    arenas, *_ = make(tmpfile)
    poke(tmpfile, 4096 + arenas[0]["info2off"] + 300, b"junk")
    r = check_namespace(tmpfile)
    assert problems(r) == ["info-backup"] and r["status"] == 1
    assert check_namespace(tmpfile, repair=True)["status"] == 2
    assert peek(tmpfile, 4096, 4096) == peek(tmpfile, 4096 + arenas[0]["info2off"], 4096)


def test_scribbled_map_is_a_bitmap_error(tmpfile):
    arenas, nlba, ss = make(tmpfile)
    a = arenas[0]
    # LBA 100 now claims LBA 7's block: one block mapped twice, another lost.
    block7 = struct.unpack("<I", peek(tmpfile, 4096 + a["mapoff"] + 28, 4))[0]
    poke(tmpfile, 4096 + a["mapoff"] + 400, struct.pack("<I", block7))
    r = check_namespace(tmpfile, repair=True)
    assert r["status"] == 1
    assert problems(r) == ["bitmap-duplicate", "bitmap-unreferenced"]
    poke(tmpfile, 4096 + a["mapoff"] + 404, struct.pack("<I", 0xC0000000 | a["internal_nlba"] + 9))
    assert "map-range" in problems(check_namespace(tmpfile))


@pytest.mark.testbuild
def test_media_error_reads_eio_until_rewritten_and_checks_clean(tmpfile):
    make(tmpfile)
    with Btt.open(tmpfile, durability="strict") as b:
        set_map_flags(b, 7, 0x40000000)
        with pytest.raises(BttError) as e:
            b.read(7, 1)
        assert e.value.errno == errno.EIO
    r = check_namespace(tmpfile)
    assert r["status"] == 0 and [f["problem"] for f in r["findings"]] == ["media-error"]
    with Btt.open(tmpfile, durability="strict") as b:
        b.write(7, pattern(9, 7, 4096))
        assert b.read(7, 1) == pattern(9, 7, 4096)
    assert check_namespace(tmpfile)["findings"] == []


def test_interrupted_write_detected_and_repaired(tmpfile):
    make(tmpfile)
    last = 49 * 7  # the newest entry of lane 0 (a commit per write always uses lane 0)
    import inject
    inject.rewind_map(tmpfile, last)
    r = check_namespace(tmpfile)
    # what the next open completes by design is a note, not a problem (issue 16, item 12)
    assert problems(r) == [] and r["status"] == 0 and r["errors"] == 0
    assert [(f["severity"], f["problem"]) for f in r["findings"]] == [("note", "interrupted-write")]
    assert check_namespace(tmpfile, repair=True)["status"] == 2
    assert check_namespace(tmpfile)["status"] == 0
    with Btt.open(tmpfile) as b:
        assert b.read(last, 1) == pattern(49, last, 4096)


@pytest.mark.parametrize("lbasize", [4096, 520])
def test_old_padding_image_converted_by_rewrite_log(tmpfile, lbasize):
    import inject
    arenas, nlba, ss = make(tmpfile, lbasize)
    logoff = 4096 + arenas[0]["logoff"]
    inject.old_padding(tmpfile)  # the pre-4.15 layout: second live slot at 32..47
    r = check_namespace(tmpfile)
    assert r["status"] == 0 and "flog-old-padding" in [f["problem"] for f in r["findings"]]
    with pytest.raises(BttError):
        check_namespace(tmpfile, rewrite_log=True)  # needs --repair
    r = check_namespace(tmpfile, repair=True, rewrite_log=True)
    assert "flog-rewritten" in [f["problem"] for f in r["findings"]]
    for lane in range(256):
        g = peek(tmpfile, logoff + 64 * lane, 64)
        assert g[16:] == bytes(48) and struct.unpack_from("<I", g, 12)[0] == 1
    assert check_namespace(tmpfile)["findings"] == []
    with Btt.open(tmpfile, durability="strict") as b:
        assert b.arenas[0]["flog_slots"] == (0, 1)
        assert b.read(7, 1) == pattern(1, 7, ss)
        b.write(8, pattern(99, 8, ss))
        assert b.read(8, 1) == pattern(99, 8, ss)
        assert b.check()["clean"]


def test_multi_arena_backup_found_from_the_end(tmpfile):
    """513 GiB sparse: arena 0's backup sits at 512 GiB - 4 KiB, arena 1's at the end."""
    with Btt.create(tmpfile, size=513 * GiB, durability="strict") as b:
        arenas = b.arenas
        b.write(arenas[1]["lba_start"] + 3, pattern(1, 3, 4096))
    poke(tmpfile, 4096, bytes(4096))
    poke(tmpfile, 4096 + arenas[1]["start"], bytes(4096))
    r = check_namespace(tmpfile, repair=True)
    assert r["status"] == 2 and r["arenas"] == 2, r["findings"]
    assert [f["arena"] for f in r["findings"] if f["problem"] == "info-primary"] == [0, 1]
    with Btt.open(tmpfile) as b:
        assert b.read(arenas[1]["lba_start"] + 3, 1) == pattern(1, 3, 4096)


def test_read_infoblock_reports_fields_and_validity(tmpfile):
    arenas, *_ = make(tmpfile, version="2.0")
    (found,) = read_infoblock(tmpfile)
    assert found["version"] == "2.0" and found["offset"] == 0
    a = found["arenas"][0]
    assert a["primary"]["signature_ok"] and a["primary"]["checksum_ok"] and a["backup_matches"]
    assert a["primary"]["parent_uuid_ok"] and a["backup"]["parent_uuid_ok"]
    assert a["primary"]["external_nlba"] == arenas[0]["external_nlba"]
    poke(tmpfile, 200, b"\x01")
    (found,) = read_infoblock(tmpfile)
    assert not found["arenas"][0]["primary"]["checksum_ok"]
    assert found["arenas"][0]["backup"]["checksum_ok"]


def test_probe_refuses_a_btt_whose_backup_survives(tmpfile):
    """Autodetection must not call a BTT with a wiped primary info block 'raw'."""
    from btt_core import probe
    make(tmpfile)
    assert probe(tmpfile)["version"] == "1.1"
    poke(tmpfile, 4096, bytes(4096))
    with pytest.raises(BttError) as e:
        probe(tmpfile)
    assert e.value.errno == errno.EUCLEAN and "backup" in str(e.value)
    check_namespace(tmpfile, repair=True)
    assert probe(tmpfile)["version"] == "1.1"
    arenas, *_ = make(tmpfile)  # both copies gone: nothing says a BTT is here, so raw
    poke(tmpfile, 4096, bytes(4096))
    poke(tmpfile, 4096 + arenas[0]["info2off"], bytes(4096))
    assert probe(tmpfile) is None


def test_rewrite_log_is_crash_safe():
    """Every prefix of --repair --rewrite-log's writes, and any subset of those not yet
    synced, leaves a BTT that opens, reads every sector right and checks clean."""
    import random

    from btt_core import Io, check_io
    io = Io.memory(40 * MiB)
    Btt.format_io(io, size=40 * MiB)
    b = Btt.open_io(io, durability="strict")
    written = {}
    for i in range(40):
        lba = (i * 37) % b.nlba
        written[lba] = pattern(i, lba, 4096)
        b.write(lba, written[lba])
    a = b.arenas[0]
    b.close()
    logoff = 4096 + a["logoff"]
    for lane in range(256):  # an old (0,2) image...
        g = bytearray(io.read(logoff + 64 * lane, 64))
        g[32:48], g[16:32] = g[16:32], bytes(16)
        io.poke(logoff + 64 * lane, bytes(g))
    last = (39 * 37) % (a["external_nlba"])  # ...with lane 0's newest write interrupted
    io.poke(4096 + a["mapoff"] + 4 * last, bytes(4))
    base = io.clone()
    io.set_recording(True)
    assert check_io(io, repair=True, rewrite_log=True)["status"] == 2
    records = io.records()
    writes = [(off, data) for _, kind, off, data in records if kind == "write"]
    syncs = [i for i, r in enumerate(records) if r[1] == "sync"]
    assert len(writes) > 256 and syncs

    def verify(img):
        b = Btt.open_io(img, durability="none")
        try:
            for lba, data in written.items():
                assert b.read(lba, 1) == data, f"LBA {lba}"
            assert b.check()["clean"]
        finally:
            b.close()

    for k in range(len(writes) + 1):
        img = base.clone()
        for off, data in writes[:k]:
            img.poke(off, data)
        verify(img)
    rng = random.Random(3)
    first_unsynced = (sum(1 for r in records[:syncs[-2] + 1] if r[1] == "write")
                      if len(syncs) > 1 else 0)
    for _ in range(100):
        img = base.clone()
        for i, (off, data) in enumerate(writes):
            if i < first_unsynced or rng.random() < 0.5:
                img.poke(off, data)
        verify(img)


@pytest.mark.testbuild
def test_injection_helpers(tmpfile):
    import inject
    arenas, nlba, ss = make(tmpfile)
    assert "media error" in inject.set_media_error(tmpfile, 7)
    with Btt.open(tmpfile, readonly=True) as b:
        with pytest.raises(BttError):
            b.read(7, 1)
    inject.wipe_info(tmpfile, which="both")
    with pytest.raises(BttError):
        check_namespace(tmpfile)


def test_read_infoblock_parent_uuid_validity(tmpfile):
    import uuid
    parent = uuid.uuid4()
    Btt.create(tmpfile, size=SIZE, parent_uuid=parent).close()
    (found,) = read_infoblock(tmpfile)  # label-less: a non-null parent is not Linux's
    assert not found["arenas"][0]["primary"]["parent_uuid_ok"]
    (found,) = read_infoblock(tmpfile, namespace_uuid=parent)
    assert found["arenas"][0]["primary"]["parent_uuid_ok"]
