"""The write log (btt_core/writelog.c) and its replayer (btt_core/replay.py, `bttctl
replay-log`): recorded real workloads survive every crash point, and broken engines are
caught (docs/write-log.md)."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import threading

import pytest

from btt_core import Btt, BttError
from btt_core._lib import lib
from btt_core.replay import LogError, Replay, read_log, replay
from btt_core.writelog import WriteLog
from bttctl.main import main as bttctl

import testbuild
from conftest import MiB, btt_file
from workloads import (
    can_mount,
    ext4_fsstress,
    fio_verify,
    have,
    mkfs_ext4,
    qemu_img_convert,
    recording,
)

LONG = bool(os.environ.get("BTT_LONG"))
E2FSCK = ["e2fsck", "-fn"]
E2FSCK_JOURNAL = ["e2fsck", "-E", "journal_only", "-y"]  # replay ext4's journal, as a mount
# The replayer must catch each (issue 14); they exist in the engine's test build only.
MUTATIONS = ("flog-before-data-durable", "flush-before-barrier2", "map-before-flog")


def broken(mutation: str | None):
    """The engine broken as `mutation` says for a `with` block (the test build), or as is."""
    return testbuild.mutated(mutation) if mutation else contextlib.nullcontext()


# ---- recording in process: fast, and every mutation -------------------------------------

def record_in_process(tmp_path, durability="group", mutation: str | None = None, n=60,
                      seed=1):
    """A server's calls without nbdkit: writes of 1-2 sectors, some FUA, a flush every 7."""
    region = btt_file(tmp_path / "r.img", 20 * MiB)
    base = str(tmp_path / "base.img")
    shutil.copyfile(region, base)
    log = WriteLog.create(tmp_path / "w.log")
    with broken(mutation):
        b = Btt.open(region, log=log, durability=durability)
        pwrite, flush = log.recorded_pwrite(b.pwrite), log.recorded_flush(b.flush)
        rng = random.Random(seed)
        for i in range(n):
            pwrite(bytes([i % 251 + 1]) * 4096 * rng.choice((1, 2)), rng.randrange(64) * 4096,
                   rng.random() < 0.1)
            if i % 7 == 6:
                flush()
        b.abandon()  # a crash: nothing more reaches the files
    log.close()
    return str(tmp_path / "w.log"), base


def record_parallel(tmp_path, mutation: str | None = None, threads=4, n=40):
    """Four threads writing LBAs of their own at once (the C calls run in parallel: the
    GIL is released), each flushing now and then, through one recorded engine."""
    region = btt_file(tmp_path / "r.img", 20 * MiB)
    base = str(tmp_path / "base.img")
    shutil.copyfile(region, base)
    log = WriteLog.create(tmp_path / "w.log")
    with broken(mutation):
        b = Btt.open(region, log=log, durability="group")
        b.start_timer(2)  # timer commits race the writers' own flushes
        pwrite, flush = log.recorded_pwrite(b.pwrite), log.recorded_flush(b.flush)
        go = threading.Barrier(threads)

        def worker(t):
            rng = random.Random(t)
            go.wait()
            for i in range(n):
                lba = t * 16 + rng.randrange(16)
                pwrite(bytes([t * 50 + i % 50 + 1]) * 4096, lba * 4096, rng.random() < 0.1)
                if rng.random() < 0.15:
                    flush()

        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        b.close()  # not abandon(): the timer thread would go on writing into freed files
    log.close()
    return str(tmp_path / "w.log"), base


@pytest.mark.testbuild
def test_parallel_writers_are_recorded_in_a_replayable_order(tmp_path):
    """The recorder is shared by every thread: a SYNC claims only the writes that completed
    before it started, so concurrent writers never make the replayer cry wolf, while a
    broken engine under the same load is still caught."""
    log, base = record_parallel(tmp_path)
    parsed = read_log(log)
    assert len({r.issued for r in parsed.requests}) == len(parsed.requests)
    rep = Replay(parsed, base, torn=2).run()
    assert rep.images >= 300 and rep.failures == 0, rep.listed[:3]
    (tmp_path / "broken").mkdir()
    log, base = record_parallel(tmp_path / "broken", "flush-before-barrier2")
    assert replay(log, base, torn=2).failures > 0


@pytest.mark.parametrize("durability", ["group", "strict"])
def test_correct_engine_replays_clean(tmp_path, durability):
    log, base = record_in_process(tmp_path, durability)
    rep = replay(log, base, torn=3)
    assert rep.images >= 400 and rep.by_kind["power"] and rep.by_kind["kill"]
    assert rep.failures == 0, rep.listed[:3]


@pytest.mark.testbuild
@pytest.mark.parametrize("name", MUTATIONS)
def test_replayer_catches_each_mutation(tmp_path, name):
    """(a) a FLUSH replied before the commit's second barrier loses acknowledged writes;
    (b) map before flog breaks the bitmap rule; (c) a commit without the data barrier
    leaves sectors that are neither old nor new."""
    log, base = record_in_process(tmp_path, "group", name)
    rep = replay(log, base, torn=3)
    assert rep.failures > 0
    expect = {"flush-before-barrier2": "lost write", "map-before-flog": "bitmap",
              "flog-before-data-durable": "neither its old nor its new"}[name]
    assert any(expect in f["problem"] for f in rep.listed + [rep.first_failure]), rep.listed[:3]


@pytest.mark.testbuild
def test_strict_flush_mutation_loses_acknowledged_writes(tmp_path):
    log, base = record_in_process(tmp_path, "strict", "flush-before-barrier2")
    rep = replay(log, base, torn=1)
    assert rep.lost_durable > 0


# ---- the log itself -----------------------------------------------------------------------

def test_log_is_never_clobbered_nor_followed(tmp_path):
    (tmp_path / "old.log").write_bytes(b"evidence")
    with pytest.raises(BttError) as e:
        WriteLog.create(tmp_path / "old.log")
    assert e.value.errno == 17 and "refusing to overwrite" in str(e.value)
    os.symlink(tmp_path / "elsewhere", tmp_path / "link.log")
    with pytest.raises(BttError):
        WriteLog.create(tmp_path / "link.log")
    assert not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "old.log").read_bytes() == b"evidence"


def test_log_records_region_and_journal_and_marks(tmp_path):
    log, _ = record_in_process(tmp_path, "group", n=14)
    parsed = read_log(log)
    roles = sorted(t.role for t in parsed.targets.values())
    assert roles == ["journal", "region"]
    kinds = {r[0] for r in parsed.records}
    assert {lib.BTT_WL_WRITE, lib.BTT_WL_SYNC, lib.BTT_WL_NBD_WRITE, lib.BTT_WL_NBD_FLUSH,
            lib.BTT_WL_NBD_REPLY} <= kinds
    assert sum(r.kind == "flush" for r in parsed.requests) == 2
    assert all(r.status == 0 and r.replied is not None for r in parsed.requests)
    assert not parsed.truncated


def test_damaged_tail_ends_the_log_and_is_reported(tmp_path):
    log, base = record_in_process(tmp_path, "group", n=20)
    whole = len(read_log(log).records)
    size = os.path.getsize(log)
    with open(log, "r+b") as f:  # the recorder killed mid-append
        f.truncate(size - 100)
    cut = read_log(log)
    assert cut.truncated and len(cut.records) < whole
    with open(log, "r+b") as f:  # a flipped bit inside a record's data
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    flipped = read_log(log)
    assert "checksum" in flipped.truncated and len(flipped.records) < whole - 1
    assert Replay(flipped, base).run().failures == 0  # a prefix of a log is a log
    # ...but the command does not pass a damaged log as if it were all of the workload
    assert bttctl(["replay-log", log, "--image", base, "--torn", "1"]) == 65
    assert bttctl(["replay-log", log, "--image", base, "--torn", "1", "--allow-truncated"]) == 0


def test_a_file_record_with_a_checksum_but_an_impossible_size_is_damage(tmp_path):
    """Checksums only say a record is whole: a FILE size of 2**62 made the replayer try
    to allocate it (a MemoryError traceback) before its sizes were bounded."""
    from btt_core.replay import FILE_DATA, RECORD
    log, _ = record_in_process(tmp_path, "group", n=5)
    raw = bytearray(open(log, "rb").read())
    pos = lib.BTT_WL_HEADER_SIZE  # the first record introduces the region: a FILE
    fields = list(RECORD.unpack_from(raw, pos))
    dpos = pos + RECORD.size
    FILE_DATA.pack_into(raw, dpos, 1 << 62, *FILE_DATA.unpack_from(raw, dpos)[1:])
    fields[8] = lib.btt_crc32c(0, bytes(raw[dpos:dpos + fields[9]]), fields[9])
    RECORD.pack_into(raw, pos, *fields)
    fields[10] = lib.btt_crc32c(0, bytes(raw[pos:pos + RECORD.size - 4]), RECORD.size - 4)
    RECORD.pack_into(raw, pos, *fields)
    open(log, "wb").write(raw)
    assert "sizes out of range" in read_log(log).truncated


def test_not_a_log_is_one_clear_refusal(tmp_path, capsys):
    (tmp_path / "x").write_bytes(b"\0" * 8192)
    with pytest.raises(LogError):
        read_log(tmp_path / "x")
    assert bttctl(["replay-log", str(tmp_path / "x"), "--image", str(tmp_path / "x")]) == 65
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a write log" in err


@pytest.mark.testbuild
def test_cli_reports_json_and_exit_status(tmp_path, capsys):
    log, base = record_in_process(tmp_path, "group", "flush-before-barrier2", n=30)
    assert bttctl(["replay-log", log, "--image", base, "--json", "--torn", "1"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["failures"] > 0 and d["first_failure"]["point"] > 0 and d["lost_durable_writes"]
    (tmp_path / "good").mkdir()
    log, base = record_in_process(tmp_path / "good", "group", n=30)
    assert bttctl(["replay-log", log, "--image", base]) == 0
    assert " 0 failures" in capsys.readouterr().out


def test_header_layout_is_what_the_doc_says(tmp_path):
    log, _ = record_in_process(tmp_path, "group", n=1)
    with open(log, "rb") as f:
        head = f.read(lib.BTT_WL_HEADER_SIZE + lib.BTT_WL_RECORD_SIZE)
    assert head[:8] == b"BTTWLOG1"
    assert struct.unpack_from("<III", head, 8) == (1, 4096, 56)
    magic, kind, target, seq = struct.unpack_from("<IHHQ", head, 4096)
    assert (magic, kind, target, seq) == (0x524C5742, lib.BTT_WL_FILE, 1, 0)


# ---- real workloads through nbdkit ------------------------------------------------------

needs_mount = pytest.mark.skipif(can_mount() is not None, reason=str(can_mount()))
nbd_clients = pytest.mark.skipif(not have("nbdkit", "fio", "qemu-img"),
                                 reason="needs nbdkit, fio and qemu-img")


def check_replay(rec, *, min_images, fsck=False, **kw):
    rep = replay(rec.log, rec.base, fsck=E2FSCK if fsck else None,
                 fsck_prepare=E2FSCK_JOURNAL if fsck else None,
                 workdir=os.path.dirname(rec.log), **kw)
    assert rep.failures == 0, rep.listed[:3]
    assert rep.images >= min_images, rep.as_dict()
    assert not rep.truncated
    if fsck:
        assert rep.fsck_runs > 0
    return rep


@pytest.mark.e2e
@needs_mount
def test_ext4_survives_every_crash_point(tmp_path):
    """The target: a real file system on the real server, >= 1,000 crash images, 0 failures
    (e2fsck -fn clean on each distinct one)."""
    rec = recording(tmp_path, "group", 24 * MiB, ext4_fsstress, prepare=mkfs_ext4)
    check_replay(rec, min_images=1000, fsck=True, torn=4, max_points=0 if LONG else 190)


@pytest.mark.e2e
@needs_mount
def test_ext4_strict(tmp_path):
    rec = recording(tmp_path, "strict", 24 * MiB,
                    lambda s, p: ext4_fsstress(s, p, ops=40), prepare=mkfs_ext4)
    check_replay(rec, min_images=100, fsck=True, torn=2, max_points=0 if LONG else 40)


@pytest.mark.e2e
@nbd_clients
@pytest.mark.parametrize("durability", ["group", "strict"])
def test_fio_verify_with_fsync(tmp_path, durability):
    rec = recording(tmp_path, durability, 20 * MiB,
                    lambda s, p: fio_verify(s, p, fsync=3, number_ios=60))
    check_replay(rec, min_images=100, torn=2, max_points=0 if LONG else 40)


@pytest.mark.e2e
@nbd_clients
@pytest.mark.parametrize("durability", ["group", "strict"])
def test_qemu_img_convert(tmp_path, durability):
    rec = recording(tmp_path, durability, 20 * MiB, qemu_img_convert)
    check_replay(rec, min_images=50, torn=2, max_points=0 if LONG else 40)


@pytest.mark.e2e
@nbd_clients
def test_none_durability_survives_kill_9(tmp_path):
    """Durability none promises nothing across a power cut: only kill -9 states are built."""
    rec = recording(tmp_path, "none", 20 * MiB, lambda s, p: fio_verify(s, p, number_ios=60))
    rep = check_replay(rec, min_images=20, max_points=0 if LONG else 40)
    assert set(rep.by_kind) == {"kill"}


@pytest.mark.e2e
@nbd_clients
@pytest.mark.parametrize("name", MUTATIONS)
def test_replayer_catches_a_broken_server(tmp_path, name):
    """The same mutations, selected in the nbdkit subprocess (BTT_TEST_MUTATION), under a
    real client: each produces failures."""
    rec = recording(tmp_path, "group", 20 * MiB,
                    lambda s, p: fio_verify(s, p, fsync=3, number_ios=40), mutation=name)
    rep = replay(rec.log, rec.base, torn=3)
    assert rep.failures > 0, rep.as_dict()


def test_bttctl_serve_log_writes(tmp_path):
    """`bttctl serve --log-writes` records a client's writes and flushes; a path that
    exists already is one line, and the server does not start."""
    import signal
    import subprocess
    import sys

    import nbd

    from nbd_helpers import ENV
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(ENV, PYTHONPATH=root)
    region = btt_file(tmp_path / "r.img", 20 * MiB)
    base = str(tmp_path / "base.img")
    shutil.copyfile(region, base)
    log = tmp_path / "w.log"
    argv = [sys.executable, "-m", "bttctl.main", "serve", "--region", region,
            "--socket", str(tmp_path / "s.sock"), "--log-writes", str(log)]
    p = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip(), p.stderr.read()
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={tmp_path / 's.sock'}")
        h.pwrite(b"\x5a" * 8192, 4096)
        h.flush()
        h.pwrite(b"\xa5" * 4096, 0, nbd.CMD_FLAG_FUA)
        h.shutdown()
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0
    parsed = read_log(log)
    assert [(r.kind, r.off, r.length, r.fua, r.status) for r in parsed.requests] == [
        ("write", 4096, 8192, False, 0), ("flush", 0, 0, False, 0), ("write", 0, 4096, True, 0)]
    assert replay(log, base, torn=2).failures == 0
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "already exists; refusing to overwrite it" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert read_log(log).requests == parsed.requests  # untouched


# ---- the long run ------------------------------------------------------------------------

@pytest.mark.long
@pytest.mark.e2e
@needs_mount
@pytest.mark.parametrize("durability", ["group", "strict"])
def test_long_real_workloads(tmp_path, durability):
    """make test-long: >= 25,000 crash images per durability mode from ext4, fio and
    qemu-img, with 0 torn sectors, 0 lost durable writes and 0 e2fsck errors."""
    total = 0
    for i, seed in enumerate((14, 15, 16)):
        d = tmp_path / f"ext4-{i}"
        d.mkdir()
        rec = recording(d, durability, 32 * MiB,
                        lambda s, p, seed=seed: ext4_fsstress(s, p, ops=200, seed=seed),
                        prepare=mkfs_ext4)
        total += check_replay(rec, min_images=1, fsck=True, torn=6).images
    d = tmp_path / "fio"
    d.mkdir()
    rec = recording(d, durability, 24 * MiB, lambda s, p: fio_verify(s, p, number_ios=400))
    total += check_replay(rec, min_images=1, torn=6).images
    d = tmp_path / "qemu"
    d.mkdir()
    rec = recording(d, durability, 24 * MiB, qemu_img_convert)
    total += check_replay(rec, min_images=1, torn=6).images
    print(f"{durability}: {total} crash images")
    assert total >= 25000
