"""Regions on a shared file system (docs/scale-out.md): a single-node GlusterFS volume
mounted twice, as host A and host B, served by the real server and driven by libnbd and fio.

* the region lock holds across the mounts, and the refusal names it;
* the lease file refuses a second server where only the lease is held (as on a file system
  whose flock is not shared), and a server that lost its lease stops;
* failover: kill -9 on A, start on B: everything acknowledged reads back on this host (the
  journal replays), and another host (another boot id) keeps every flushed write and, per
  sector, the old or the new content of the others;
* crash consistency: fio verify across kill -9 on the volume, check-namespace clean.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from btt_core import Btt, Io
from nvdimm import lease

from conftest import MiB, btt_file, pattern
from glusterfs import Unavailable, Volume
from nbd_helpers import ENV, Server, connect
from test_e2e_durability import kill_9_cycles
from testbuild import server_env

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BTTCTL = [sys.executable, "-m", "bttctl.main"]
SECTOR = 4096


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    vol = Volume(tmp_path_factory.mktemp("gluster"))
    try:
        vol.start()
    except Unavailable as e:
        pytest.skip(f"no GlusterFS volume: {e}")
    yield vol
    vol.stop()


@pytest.fixture
def hosts(volume, request):
    """The same fresh directory seen from host A and from host B."""
    name = request.node.name.replace("[", "_").replace("]", "")
    a, b = (os.path.join(m, name) for m in volume.mounts)
    os.mkdir(a)
    return a, b


def bttctl(*args, timeout=60):
    return subprocess.run([*BTTCTL, *args], env=dict(ENV, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=timeout)


def serve_fails(tmp_path, region, *args):
    p = bttctl("serve", "--region", region, "--socket", str(tmp_path / "b.sock"), *args)
    assert p.returncode == 1 and p.stdout == "", (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    return p.stderr.strip()


def test_the_lock_holds_across_mounts_and_the_refusal_names_it(tmp_path, hosts):
    a, b = hosts
    btt_file(os.path.join(a, "r.img"), size=32 * MiB)
    with _server(tmp_path, "a", os.path.join(a, "r.img")):
        err = serve_fails(tmp_path, os.path.join(b, "r.img"))
        assert len(err.splitlines()) == 1
        assert f"{b}/r.img is locked by another server" in err
        # nbdkit itself, without bttctl's check first, says the same in its log.
        other = Server(_dir(tmp_path, "b2"), [os.path.join(b, "r.img")])
        with pytest.raises(RuntimeError, match="is locked by another server"):
            other.start()
        other.stop()
    # A clean stop releases the lease (auto: GlusterFS is a shared file system); the file
    # stays, as a record of who held it last.
    rec = lease.decode(open(os.path.join(a, "r.img.lease"), "rb").read())
    assert rec is not None and rec["state"] == "released"


def _dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return d


def _server(tmp_path, name, region, *params, env=None):
    return Server(_dir(tmp_path, name), [region], *params, env=env)


def test_the_lease_refuses_a_server_where_only_the_lease_is_held(tmp_path, hosts):
    """This process takes the lease on host A's mount and no flock, as a server on a file
    system whose locks are not shared would hold it: a server on host B is refused with
    the holder's pid and host. Control: with lease=off the same server starts."""
    a, b = hosts
    btt_file(os.path.join(a, "r.img"), size=32 * MiB)
    held = lease.acquire(os.path.join(a, "r.img"), settle=0.1)
    try:
        err = serve_fails(tmp_path, os.path.join(b, "r.img"), "--lease", "on")
        assert len(err.splitlines()) == 1
        assert f"is leased by pid {os.getpid()} on host {os.uname().nodename}" in err
        s = _server(tmp_path, "b", os.path.join(b, "r.img"), "lease=on")
        with pytest.raises(RuntimeError, match=f"leased by pid {os.getpid()}"):
            s.start()
        s.stop()
        with _server(tmp_path, "c", os.path.join(b, "r.img"), "lease=off") as s:
            h = connect(s)
            assert h.get_size() > 0
            h.shutdown()
    finally:
        held.close()
    with _server(tmp_path, "d", os.path.join(b, "r.img"), "lease=on"):
        pass  # released: taken at once


def test_a_server_that_lost_its_lease_stops(tmp_path, hosts):
    """Server A is frozen (SIGSTOP) past its lease's ttl; host B takes the stale lease.
    When A runs again, its heartbeat finds the lease late and A kills itself before it
    writes anything more: two writers would corrupt the BTT."""
    a, b = hosts
    btt_file(os.path.join(a, "r.img"), size=32 * MiB)
    s = _server(tmp_path, "a", os.path.join(a, "r.img"), "lease=on", "lease-ttl=2").start()
    try:
        with pytest.raises(OSError, match="is leased by pid"):
            lease.acquire(os.path.join(b, "r.img"), settle=0.1)
        s.proc.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        taker = lease.acquire(os.path.join(b, "r.img"), ttl=30, settle=0.1)
        s.proc.send_signal(signal.SIGCONT)
        try:
            assert s.proc.wait(10) == -signal.SIGKILL
        finally:
            taker.close()
        assert "stopping this server at once" in s.output()
    finally:
        s.stop()


def _write_sets(h, n):
    """Set 1 (flushed) at LBAs 0..n-1, then set 2 (acknowledged, not flushed) at n..2n-1."""
    for lba in range(n):
        h.pwrite(pattern(1, lba, SECTOR), lba * SECTOR)
    h.flush()
    for lba in range(n, 2 * n):
        h.pwrite(pattern(2, lba, SECTOR), lba * SECTOR)


def _kill_9_after_writes(tmp_path, region, n, env=None):
    # commit-ms=60000: no timer commit, so set 2 is acknowledged through the journal alone
    # when the server dies (n stays below half an arena's lanes, which would commit).
    s = _server(tmp_path, "a", region, "commit-ms=60000", f"control={tmp_path}/a.ctl",
                env=env).start()
    try:
        h = connect(s)
        _write_sets(h, n)
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
    finally:
        s.stop()


N = 64  # sectors per set


@pytest.mark.parametrize("mutation", [None, "no-journal"])
def test_failover_kill_9_on_host_a_then_serve_from_host_b(tmp_path, hosts, mutation):
    """Same boot (this machine is both hosts): B replays A's journal, so every acknowledged
    write reads back; the mutation (a server without its journal) loses set 2 and is
    caught. Another host would not replay (another boot id): checked on the same files
    read-only, every flushed write is there and each sector of set 2 is old or new."""
    a, b = hosts
    btt_file(os.path.join(a, "r.img"), size=32 * MiB)
    env = server_env(mutation) if mutation else None
    _kill_9_after_writes(tmp_path, os.path.join(a, "r.img"), N, env)
    region_b = os.path.join(b, "r.img")

    if mutation is None:
        with _open_readonly(region_b, boot=os.urandom(16)) as other:  # another host
            assert other.stats()["journal_replayed"] == 0
            for lba in range(N):
                assert other.read(lba, 1) == pattern(1, lba, SECTOR), f"flushed LBA {lba} lost"
            for lba in range(N, 2 * N):
                assert other.read(lba, 1) in (bytes(SECTOR), pattern(2, lba, SECTOR))
        with _open_readonly(region_b, boot=None) as same:  # control: this boot replays
            assert same.stats()["journal_replayed"] == N

    with _server(tmp_path, "b", region_b, f"control={tmp_path}/b.ctl") as s:  # the lease
        h = connect(s)                                   # of a dead pid here is stale
        if mutation is None:
            # One control view over both hosts' sockets finds the namespace by its uuid
            # where it runs now; A's socket, left by the killed server, is skipped.
            (ns,) = json.loads(bttctl("list", "--control", f"{tmp_path}/b.ctl").stdout)
            p = bttctl("get", f"{ns['uuid']}/size", "--control", f"{tmp_path}/a.ctl",
                       "--control", f"{tmp_path}/b.ctl")
            assert p.returncode == 0 and int(p.stdout) == ns["raw_size"], p.stderr
        flushed_lost = [lba for lba in range(N) if h.pread(SECTOR, lba * SECTOR)
                        != pattern(1, lba, SECTOR)]
        acked_lost = [lba for lba in range(N, 2 * N) if h.pread(SECTOR, lba * SECTOR)
                      != pattern(2, lba, SECTOR)]
        h.shutdown()
    assert not flushed_lost
    if mutation is None:
        assert not acked_lost, f"{len(acked_lost)} acknowledged writes lost after failover"
    else:
        assert acked_lost, "a server without its journal lost nothing: the test proves nothing"
    p = bttctl("check-namespace", region_b)
    assert p.returncode == 0, p.stdout + p.stderr


@contextlib.contextmanager
def _open_readonly(region, boot):
    """The engine a server with `boot` would open, read-only: recovery and replay happen in
    memory, nothing on the volume changes."""
    io = Io.file(region, readonly=True)
    jio = Io.file(region + ".journal", readonly=True)
    try:
        b = Btt.open_io(io, readonly=True, journal=jio, boot=boot)
        try:
            yield b
        finally:
            b.close()
    finally:
        jio.close()
        io.close()


def test_fio_verify_across_kill_9_on_the_volume(tmp_path, hosts):
    """fio writes through a server on host A, which is killed mid-run; a server on host B
    verifies every acknowledged write, and the BTT checks clean."""
    a, b = hosts
    region, lost = kill_9_cycles(tmp_path, "group", 1, size=64, regions=(a, b))
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. at offsets {lost[:5]}"
    p = bttctl("check-namespace", os.path.join(b, os.path.basename(region)))
    assert p.returncode == 0, p.stdout + p.stderr
