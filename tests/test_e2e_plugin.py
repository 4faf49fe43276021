"""The plugin's edges through nbdkit and libnbd: raw-mode semantics, fast zero, zero-flag=on,
sector sizes, parameters nbdkit must refuse, one server per region, and a quiet log when a
client misbehaves."""
import errno
import os
import subprocess

import pytest

from btt_core import Btt

from conftest import MiB, btt_file, pattern, sparse_file
from nbd_helpers import ENTRY, ENV, Server, connect

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e


@pytest.fixture
def sector_region(tmp_path):
    return btt_file(tmp_path / "region.img", 64 * MiB)


@pytest.fixture
def raw_region(tmp_path):
    """A raw file whose size is not a multiple of the 4096-byte block."""
    return sparse_file(tmp_path / "raw.img", 16 * MiB + 1000)


def allocated(path):
    """Bytes of the file backed by storage."""
    return os.stat(path).st_blocks * 512


def test_raw_mode_semantics(tmp_path, raw_region):
    with Server(tmp_path, [raw_region]) as s:
        h = connect(s, strict=False)
        try:
            # The tail shorter than a block is not exported; blocks are 4096 bytes.
            assert h.get_size() == 16 * MiB
            assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096 == h.get_block_size(
                nbd.SIZE_PREFERRED)
            assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
            assert h.can_multi_conn() and h.can_fast_zero()

            data = b"".join(pattern(1, i, 4096) for i in range(16))
            h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
            h.flush()
            assert h.pread(len(data), 0) == data

            # Misaligned requests are refused like on sector exports, and touch nothing.
            for call in (lambda: h.pread(4096, 512), lambda: h.pread(1000, 0),
                         lambda: h.pwrite(b"x" * 4096, 100), lambda: h.zero(512, 0)):
                with pytest.raises(nbd.Error) as e:
                    call()
                assert e.value.errnum == errno.EINVAL
            assert h.pread(len(data), 0) == data

            # Zeroing that may trim punches a hole; NO_HOLE leaves allocated zeros.
            assert allocated(raw_region) == 65536
            h.zero(16384, 0, nbd.CMD_FLAG_FAST_ZERO)
            assert allocated(raw_region) == 65536 - 16384
            h.zero(16384, 16384, nbd.CMD_FLAG_NO_HOLE)
            assert allocated(raw_region) == 65536 - 16384
            with pytest.raises(nbd.Error) as e:
                h.trim(4096, 32768 + 512)
            assert e.value.errnum == errno.EINVAL
            h.trim(8192, 32768)
            assert allocated(raw_region) == 65536 - 16384 - 8192
            assert h.pread(65536, 0) == bytes(40960) + data[40960:]
        finally:
            h.shutdown()
    with open(raw_region, "rb") as f:
        assert f.read(65536) == bytes(40960) + data[40960:]


@pytest.mark.parametrize("sector_size,version", [(512, "1.1"), (520, "1.1"), (4096, "2.0")])
def test_sector_sizes_and_versions(tmp_path, sector_size, version):
    path = str(tmp_path / "region.img")
    Btt.create(path, size=32 * MiB, sector_size=sector_size, version=version).close()
    wire = 512 if sector_size < 4096 else 4096  # a 520-byte lbasize exports 512 on the wire
    with Server(tmp_path, [path]) as s:
        h = connect(s, strict=False)
        assert h.get_block_size(nbd.SIZE_MINIMUM) == wire == h.get_block_size(nbd.SIZE_PREFERRED)
        data = b"".join(pattern(2, i, wire) for i in range(9))
        h.pwrite(data, 3 * wire)
        assert h.pread(len(data), 3 * wire) == data
        if wire == 512:
            with pytest.raises(nbd.Error) as e:
                h.pread(512, 256)
            assert e.value.errnum == errno.EINVAL
        h.shutdown()
    with Btt.open(path, readonly=True) as b:
        assert b.version == version and b.lbasize == sector_size
        assert b.read(3, 9) == data


def test_fast_zero_refused_without_the_zero_flag(tmp_path, sector_region):
    """FAST_ZERO is advertised (nbdkit 1.32 aborts on an unadvertised one) and refused with
    ENOTSUP when zeroing would mean writing every sector; nothing is touched, and both this
    connection and the server keep serving."""
    with Server(tmp_path, [sector_region]) as s:
        h = connect(s, strict=False)
        assert h.can_fast_zero() and not h.can_trim()
        h.pwrite(pattern(3, 0, 4096), 0)
        for flags in (nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE):
            with pytest.raises(nbd.Error) as e:
                h.zero(4096, 0, flags)
            assert e.value.errnum == errno.ENOTSUP
        assert h.pread(4096, 0) == pattern(3, 0, 4096)
        with pytest.raises(nbd.Error):  # TRIM is not advertised; nbdkit refuses it
            h.trim(4096, 0)
        h.zero(4096, 0)  # a plain WRITE_ZEROES writes zero sectors
        assert h.pread(4096, 0) == bytes(4096)
        h.shutdown()
        assert "Assertion" not in s.output()
        h2 = connect(s)
        assert h2.pread(4096, 0) == bytes(4096)
        h2.shutdown()


def test_zero_flag_on_serves_trim_and_fast_zero(tmp_path, sector_region):
    with Server(tmp_path, [sector_region], "zero-flag=on") as s:
        h = connect(s)
        assert h.can_trim() and h.can_fast_zero()
        data = b"".join(pattern(4, i, 4096) for i in range(8))
        h.pwrite(data, 0)
        h.trim(8192, 0)
        h.zero(8192, 16384, nbd.CMD_FLAG_FAST_ZERO)
        with pytest.raises(nbd.Error) as e:  # allocated zeros cannot be fast here
            h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        assert e.value.errnum == errno.ENOTSUP
        expect = bytes(8192) + data[8192:16384] + bytes(8192) + data[24576:]
        assert h.pread(len(data), 0) == expect
        h.flush()
        h.shutdown()
    with Btt.open(sector_region, readonly=True) as b:
        assert b.read(0, 8) == expect
        assert b.check()["clean"]


def test_connections_share_one_engine(tmp_path, sector_region):
    """can_multi_conn: what one connection wrote, another reads at once, and a flush on
    either covers both."""
    with Server(tmp_path, [sector_region]) as s:
        a, b = connect(s), connect(s)
        assert a.can_multi_conn() and b.can_multi_conn()
        a.pwrite(pattern(6, 10, 4096), 10 * 4096)
        b.pwrite(pattern(7, 11, 4096), 11 * 4096)
        assert b.pread(4096, 10 * 4096) == pattern(6, 10, 4096)
        assert a.pread(4096, 11 * 4096) == pattern(7, 11, 4096)
        b.flush()
        a.shutdown()
        b.shutdown()


def test_bad_client_gets_errors_and_a_quiet_log(tmp_path, sector_region):
    """Hundreds of refused requests: every one fails with EINVAL, the server keeps serving,
    and the log carries a short entry per failure, not the engine's stack."""
    with Server(tmp_path, [sector_region]) as s:
        h = connect(s, strict=False)
        for i in range(200):
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, 4096 * i + 512)
            assert e.value.errnum == errno.EINVAL
        h.pwrite(b"k" * 4096, 0)
        assert h.pread(4096, 0) == b"k" * 4096
        h.shutdown()
        log = s.output()
    assert log.count("not aligned") == 200
    assert "engine.py" not in log and len(log.splitlines()) <= 200 * 5


def nbdkit_fails(tmp_path, *params, regions=()):
    """nbdkit's stderr after it refused to start with these parameters."""
    sock = str(tmp_path / "refused.sock")
    p = subprocess.Popen(["nbdkit", "--foreground", "--unix", sock, "python", ENTRY,
                          *[f"region={r}" for r in regions], *params],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError(f"nbdkit started with {params} {regions}") from None
    assert p.returncode != 0 and not os.path.exists(sock)
    return err


def test_bad_parameters_refused(tmp_path, sector_region):
    assert "unknown parameter frob=1" in nbdkit_fails(tmp_path, "frob=1", regions=[sector_region])
    assert "durability=fast: use group, strict or none" in nbdkit_fails(
        tmp_path, "durability=fast", regions=[sector_region])
    assert "zero-flag=yes" in nbdkit_fails(tmp_path, "zero-flag=yes", regions=[sector_region])
    assert "threadmodel=x" in nbdkit_fails(tmp_path, "threadmodel=x", regions=[sector_region])
    assert "give at least one region=FILE" in nbdkit_fails(tmp_path)
    assert "no such file" in nbdkit_fails(tmp_path, regions=[str(tmp_path / "nope.img")])
    link = str(tmp_path / "link.img")
    os.symlink(sector_region, link)
    assert "is the same file as" in nbdkit_fails(tmp_path, regions=[sector_region, link])


def test_one_server_per_region(tmp_path, sector_region):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    with Server(first, [sector_region]) as s:
        with pytest.raises(RuntimeError, match="served by another process"):
            Server(second, [sector_region]).start()
        h = connect(s)
        h.pwrite(pattern(8, 0, 4096), 0)
        h.shutdown()
    with Server(second, [sector_region]) as s:  # the lock went with the first server
        h = connect(s)
        assert h.pread(4096, 0) == pattern(8, 0, 4096)
        h.shutdown()


def test_readonly_on_writes_nothing(tmp_path, sector_region):
    """readonly=on (what `bttctl serve --readonly` adds to nbdkit -r): a BTT left with
    staged writes in its journal by a killed server is replayed in memory only, so clients
    read every acknowledged write, and neither the region nor the journal changes."""
    import hashlib

    b = Btt.open(sector_region, durability="group")
    b.write(5, pattern(4, 5, 4096))  # staged: only the journal knows the map change
    b.abandon()  # as kill -9 would leave it
    journal = sector_region + ".journal"

    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    before = (digest(sector_region), digest(journal), os.stat(sector_region).st_mtime_ns)
    with Server(tmp_path, [sector_region], "readonly=on", readonly=True) as s:
        h = connect(s)
        assert h.pread(4096, 5 * 4096) == pattern(4, 5, 4096)
        assert h.is_read_only()
        h.shutdown()
    assert (digest(sector_region), digest(journal), os.stat(sector_region).st_mtime_ns) == before
    with Server(tmp_path, [sector_region]) as s:  # served read-write, the replay is committed
        h = connect(s)
        assert h.pread(4096, 5 * 4096) == pattern(4, 5, 4096)
        h.shutdown()
    assert digest(sector_region) != before[0]


def test_expected_refusals_are_one_line(tmp_path, sector_region):
    """A second server on a locked region, a control path that is not a socket and an
    unknown export name are ordinary events: one line each in the log, no traceback."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    err = nbdkit_fails(tmp_path, f"control={precious}", regions=[sector_region])
    assert f"control socket path {precious} is a regular file" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert precious.read_text() == "keep me\n"
    first = tmp_path / "a"
    first.mkdir()
    with Server(first, [sector_region]) as s:
        err = nbdkit_fails(tmp_path, regions=[sector_region])
        assert "locked by another server" in err and sector_region in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        with pytest.raises(nbd.Error):
            connect(s, export="nosuch")
        h = connect(s)
        h.shutdown()
    log = s.output()
    assert "no export named 'nosuch'; exports: namespace0.0" in log and "Traceback" not in log
