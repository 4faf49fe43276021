"""End to end through nbdkit and real clients: libnbd, qemu-io, qemu-img, fio, nbdfuse."""
import errno
import hashlib
import os
import shutil
import subprocess

import pytest

from btt_core import Btt

from conftest import MiB, btt_file, pattern, run, sparse_file
from nbd_helpers import ENV, Server, connect
from workloads import loop_device

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e


@pytest.fixture
def sector_region(tmp_path):
    return btt_file(tmp_path / "region.img", 256 * MiB)


@pytest.fixture
def raw_region(tmp_path):
    return sparse_file(tmp_path / "raw.img", 64 * MiB)


@pytest.fixture
def server(tmp_path, sector_region):
    with Server(tmp_path, [sector_region], "durability=group") as s:
        yield s


def test_libnbd_roundtrips_sector_mode(server):
    h = connect(server)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096 == h.get_block_size(nbd.SIZE_PREFERRED)
    assert h.can_fua() and h.can_flush() and h.can_multi_conn() and h.can_zero()
    data = b"".join(pattern(1, lba, 4096) for lba in range(8))
    h.pwrite(data, 4096 * 10)
    assert h.pread(len(data), 4096 * 10) == data
    h.pwrite(pattern(2, 3, 4096), 3 * 4096, nbd.CMD_FLAG_FUA)
    h.flush()
    h.zero(8192, 4096 * 12)
    assert h.pread(8192, 4096 * 12) == bytes(8192)
    assert h.pread(4096, 3 * 4096) == pattern(2, 3, 4096)
    h.shutdown()


def test_data_lands_in_the_btt(tmp_path, sector_region):
    with Server(tmp_path, [sector_region]) as s:
        h = connect(s)
        h.pwrite(pattern(5, 77, 4096), 77 * 4096)
        h.shutdown()
    with Btt.open(sector_region) as b:
        assert b.read(77, 1) == pattern(5, 77, 4096)
        assert b.check()["clean"]


def test_raw_mode_autodetected(tmp_path, raw_region):
    with Server(tmp_path, [raw_region]) as s:
        h = connect(s)
        assert h.get_size() == 64 * MiB and h.can_trim()
        h.pwrite(b"r" * 4096, 0)
        h.shutdown()
    with open(raw_region, "rb") as f:
        assert f.read(4096) == b"r" * 4096


def test_export_listing_descriptions_and_unknown_export(tmp_path, sector_region, raw_region):
    with Server(tmp_path, [sector_region, raw_region]) as s:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_unix(s.sock)
        listed = []
        h.opt_list(lambda name, desc: listed.append((name, desc)) or 0)
        h.opt_abort()
        names = dict(listed)
        assert set(names) == {"namespace0.0", "namespace1.0"}
        assert "sector mode" in names["namespace0.0"] and "uuid" in names["namespace0.0"]
        assert "raw mode" in names["namespace1.0"]
        h = connect(s, export="")  # the default export
        assert h.get_size() == Btt.open(sector_region, readonly=True).size
        h.shutdown()
        with pytest.raises(nbd.Error):
            connect(s, export="nosuch")
        assert "nosuch" in s.output()


def test_bad_requests_fail_and_the_server_keeps_serving(server):
    h = connect(server, strict=False)
    try:
        size = h.get_size()
        for call in (lambda: h.pread(4096, size),            # past the end
                     lambda: h.pwrite(b"x" * 4096, size),
                     lambda: h.pread(4096, 100),              # misaligned offset
                     lambda: h.pread(1000, 4096),             # misaligned length
                     lambda: h.pwrite(b"x" * 100, 8192),
                     lambda: h.zero(100, 4096),
                     lambda: h.pread(33 * MiB, 0),            # above the advertised maximum
                     lambda: h.pread(0, 4096)):               # zero length (nbdkit: EINVAL)
            with pytest.raises(nbd.Error) as e:
                call()
            assert e.value.errnum in (errno.EINVAL, errno.ENOSPC, errno.ERANGE), e.value
        h.pwrite(b"ok" * 2048, 8192)
        assert h.pread(4096, 8192) == b"ok" * 2048
    finally:
        h.shutdown()


def test_misaligned_write_touches_nothing(server):
    h = connect(server, strict=False)
    h.pwrite(pattern(1, 2, 4096) * 2, 2 * 4096)
    with pytest.raises(nbd.Error):
        h.pwrite(b"z" * 4096, 2 * 4096 + 512)
    assert h.pread(8192, 2 * 4096) == pattern(1, 2, 4096) * 2
    h.shutdown()


def test_readonly_server_refuses_writes(tmp_path, sector_region):
    with Server(tmp_path, [sector_region], readonly=True) as s:
        h = connect(s, strict=False)
        assert h.is_read_only()
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 4096, 0)
        assert e.value.errnum in (errno.EROFS, errno.EPERM)
        h.shutdown()


def test_readonly_file_is_served_readonly(tmp_path, sector_region):
    with Btt.open(sector_region) as b:
        b.write(0, pattern(1, 0, 4096))
    os.chmod(sector_region, 0o444)
    immutable = False
    if os.access(sector_region, os.W_OK):  # root ignores file modes; an immutable file it can't
        immutable = subprocess.run(["chattr", "+i", sector_region]).returncode == 0
        if not immutable:
            pytest.skip("cannot make a read-only file here")
    try:
        with Server(tmp_path, [sector_region]) as s:
            h = connect(s, strict=False)
            try:
                assert h.is_read_only()
                assert h.pread(4096, 0) == pattern(1, 0, 4096)
                with pytest.raises(nbd.Error):
                    h.pwrite(b"x" * 4096, 0)
            finally:
                h.shutdown()
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", sector_region])


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_qemu_io_patterns(server, cache):
    out = run(["qemu-io", "-f", "raw", "-t", cache, server.uri(),
               "-c", "write -P 0xab 0 4M", "-c", "read -P 0xab 0 4M",
               "-c", "write -z 1M 64k", "-c", "read -P 0 1M 64k",
               "-c", "aio_write -P 0x11 8M 1M", "-c", "aio_flush", "-c", "flush",
               "-c", "read -P 0x11 8M 1M",
               "-c", "writev -P 0x22 16M 4k 8k", "-c", "readv -P 0x22 16M 4k 8k"])
    assert "Pattern verification failed" not in out.stdout + out.stderr


def test_qemu_img_qcow2_on_the_export(tmp_path, server):
    q, gold = str(tmp_path / "q.qcow2"), str(tmp_path / "gold.raw")
    run(["qemu-img", "create", "-q", "-f", "qcow2", q, "200M"])
    run(["qemu-io", "-f", "qcow2", q, "-c", "write -P 0x5a 0 16M"])
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", q, server.uri()])
    run(["qemu-io", "-f", "qcow2", server.uri(), "-c", "write -P 0x33 32M 8M"])
    run(["qemu-io", "-f", "qcow2", q, "-c", "write -P 0x33 32M 8M"])
    assert "No errors were found" in run(["qemu-img", "check", "-f", "qcow2", server.uri()]).stdout
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", q, gold])
    assert "identical" in run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                               server.uri(), gold]).stdout


def test_fio_verify(tmp_path, server):
    out = tmp_path / "fio.json"
    run(["fio", "--name=v", "--ioengine=nbd", f"--uri={server.uri()}", "--rw=randwrite",
         "--bs=4k", "--size=64M", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1",
         "--do_verify=1", "--number_ios=4000", "--output-format=json", f"--output={out}"],
        cwd=str(tmp_path))
    import json
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


@pytest.mark.skipif(not os.path.exists("/dev/fuse")
                    or not shutil.which("nbdfuse", path=ENV["PATH"]),
                    reason="needs /dev/fuse and nbdfuse")
def test_ext4_through_nbdfuse(tmp_path, sector_region):
    """nbdfuse exposes the export as a file; a loop device with 4096-byte sectors on it makes
    every request sector-aligned, as a kernel nbd device would."""
    fs = tmp_path / "fs"
    fs.mkdir()
    with Server(tmp_path, [sector_region]) as s, loop_device(s, tmp_path) as loop:
        run(["mkfs.ext4", "-q", "-F", loop])
        run(["mount", loop, str(fs)])
        try:
            for i in range(20):
                (fs / f"f{i}").write_bytes(os.urandom(100_000))
        finally:
            run(["umount", str(fs)])
        assert run(["e2fsck", "-fn", loop], check=False).returncode == 0
        with open(loop, "rb") as f:
            served = hashlib.sha256(f.read()).hexdigest()
    with Btt.open(sector_region, readonly=True) as b:
        h = hashlib.sha256()
        for lba in range(0, b.nlba, 256):
            h.update(b.read(lba, min(256, b.nlba - lba)))
        assert h.hexdigest() == served
        assert b.check()["clean"]
