"""nvdimm/lease.py: the lease file that keeps a region to one server where flock cannot be
trusted across hosts (docs/scale-out.md). On any local directory; tests/test_scale_out.py
uses it across two mounts of a GlusterFS volume."""
import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from nvdimm import lease
from nvdimm.errors import NdError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def region(tmp_path):
    path = tmp_path / "r.img"
    path.write_bytes(b"")
    return str(path)


def record(region):
    with open(lease.lease_path(region), "rb") as f:
        return lease.decode(f.read())


def test_a_fresh_lease_refuses_and_names_its_holder(region):
    held = lease.acquire(region, settle=0)
    try:
        with pytest.raises(NdError) as e:
            lease.acquire(region, settle=0)
        assert e.value.errno == errno.EBUSY
        assert f"is leased by pid {os.getpid()} on host {os.uname().nodename}" in str(e.value)
        with pytest.raises(NdError, match="is leased by"):
            lease.refuse_if_held(region)
    finally:
        held.close()
    rec = record(region)
    assert rec["state"] == "released" and os.path.exists(lease.lease_path(region))
    lease.refuse_if_held(region)
    lease.acquire(region, settle=0).close()  # a released lease is free at once


def test_a_stale_lease_is_taken_over_and_its_old_holder_notices(region):
    old = lease.acquire(region, ttl=0.5, settle=0)
    try:
        time.sleep(0.6)  # no heartbeat for longer than the ttl
        new = lease.acquire(region, settle=0)
        with pytest.raises(NdError) as e:
            old.renew()
        assert e.value.errno == errno.ETIMEDOUT  # too late to renew: it may be taken
        old.renewed = time.monotonic()  # even a timely renewal sees the new holder
        with pytest.raises(NdError, match="taken over by pid"):
            old.renew()
        new.renew()
        new.close()
    finally:
        os.close(old.fd)


def test_a_dead_holder_on_this_host_is_stale_at_once(region):
    """kill -9 of a server here need not wait out the ttl: its pid is gone."""
    code = ("import sys; sys.path.insert(0, '.'); from nvdimm import lease; "
            f"lease.acquire({region!r}, settle=0); print('held', flush=True)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert p.stdout == "held\n", p.stderr
    assert record(region)["state"] == "held"  # it exited holding it
    lease.acquire(region, settle=0).close()


def test_the_heartbeat_keeps_a_short_lease(region):
    held = lease.acquire(region, ttl=0.4, settle=0)
    lost = []
    held.start_heartbeat(lost.append)
    try:
        time.sleep(1.2)  # three ttls
        with pytest.raises(NdError, match="is leased by"):
            lease.acquire(region, settle=0)
        assert not lost
    finally:
        held.close()


def _take_at_once(region, monkeypatch, n=2):
    """n acquirers of a stale lease, each writing its record only once all have read the
    stale one (the worst interleaving, made certain): (leases got, refusals)."""
    lease.acquire(region, ttl=0.1, settle=0)  # left held, then stale
    time.sleep(0.15)
    got, refused, gate, all_read = [], [], threading.Barrier(n), threading.Barrier(n)
    write = lease.Lease._write

    def write_after_all_read(self, state):
        if state == "held" and not getattr(self, "raced", False):
            self.raced = True
            all_read.wait(5)
        write(self, state)
    monkeypatch.setattr(lease.Lease, "_write", write_after_all_read)

    def take():
        gate.wait()
        try:
            got.append(lease.acquire(region, settle=0.3))
        except NdError as e:
            refused.append(e)
    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got, refused


def test_of_two_servers_taking_a_stale_lease_at_once_one_wins(region, monkeypatch):
    """Both read the stale record and write theirs; reading it back after the settle tells
    each whether it won: exactly one goes on."""
    got, refused = _take_at_once(region, monkeypatch)
    assert len(got) == 1 and len(refused) == 1, refused
    assert "is leased by" in str(refused[0])
    got[0].close()


def test_the_race_check_catches_a_lease_that_skips_its_read_back(region, monkeypatch):
    """The mutation: an acquire that takes its own write for granted lets both win."""
    monkeypatch.setattr(lease.Lease, "ours", lambda self, rec: True)
    got, _ = _take_at_once(region, monkeypatch)
    assert len(got) == 2
    for held in got:
        os.close(held.fd)


def test_damaged_or_foreign_lease_files(region, tmp_path):
    path = lease.lease_path(region)
    with open(path, "wb") as f:
        f.write(b"x" * 100)
    with pytest.raises(NdError, match="is not a lease file"):
        lease.acquire(region, settle=0)
    assert open(path, "rb").read() == b"x" * 100  # left alone
    with open(path, "wb") as f:  # a record torn by a crash, a moment ago
        f.write(lease.encode({"state": "held"})[:300].ljust(lease.RECORD_SIZE, b"\0"))
    with pytest.raises(NdError, match="no valid lease record"):
        lease.acquire(region, ttl=5, settle=0)
    old = time.time() - 10
    os.utime(path, (old, old))  # ...long ago: its writer is gone
    lease.acquire(region, ttl=5, settle=0).close()
    os.unlink(path)
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(OSError) as e:
        lease.acquire(region, settle=0)
    assert e.value.errno == errno.ELOOP and not (tmp_path / "elsewhere").exists()


def test_records_are_checked_before_use():
    rec = {"state": "held", "pid": 1, "host": "h", "boot": "b", "token": "t",
           "heartbeat": 1.0, "ttl": 15}
    raw = lease.encode(rec)
    assert len(raw) == lease.RECORD_SIZE and lease.decode(raw) == rec
    flipped = bytearray(raw)
    flipped[40] ^= 1
    assert lease.decode(bytes(flipped)) is None
    assert lease.decode(lease.encode(dict(rec, ttl=-1))) is None
    assert lease.decode(lease.encode(dict(rec, pid="1"))) is None
    assert lease.decode(lease.encode(dict(rec, state="mine"))) is None
    assert lease.decode(raw[:-1]) is None
    with pytest.raises(NdError, match="does not fit"):
        lease.encode(dict(rec, host="h" * 600))


def test_auto_takes_a_lease_on_shared_file_systems_only(region):
    assert lease.wanted(region, "on") and not lease.wanted(region, "off")
    kind = lease.fs_type(region)
    assert kind and lease.wanted(region, "auto") == (kind.startswith("fuse.") or kind in
                                                     lease.SHARED_FS)
    with pytest.raises(NdError, match="use auto, on, off"):
        lease.wanted(region, "maybe")


@pytest.mark.parametrize("field,value", [("pid", True), ("pid", 1 << 70), ("pid", 0),
                                         ("heartbeat", float("nan")),
                                         ("heartbeat", float("inf"))])
def test_a_record_with_a_checksum_but_impossible_values_is_damaged(field, value):
    """A record whose CRC holds is still untrusted: a pid beyond pid_t made os.kill raise
    OverflowError (a traceback), and a NaN heartbeat read as stale, free to take."""
    good = {"state": "held", "pid": 4242, "host": "h", "boot": "b", "token": "t",
            "heartbeat": time.time(), "ttl": 15.0}
    assert lease.decode(lease.encode(good)) == good
    assert lease.decode(lease.encode(dict(good, **{field: value}))) is None


def test_a_slow_take_over_is_given_up(region, monkeypatch):
    """The read-back after `settle` sees a rival only if our write landed within settle / 2
    of the stale read: a take-over slower than that could miss a rival's later write, so it
    is refused (retry) instead of trusted."""
    slow_read = lease.read_record

    def read_record(path, fd):
        time.sleep(0.15)
        return slow_read(path, fd)

    monkeypatch.setattr(lease, "read_record", read_record)
    with pytest.raises(NdError) as e:
        lease.acquire(region, settle=0.2)
    assert e.value.errno == errno.EBUSY and "retry" in str(e.value)
    monkeypatch.setattr(lease, "read_record", slow_read)
    lease.acquire(region, settle=0.2).close()


def _stop_at_once(stderr) -> subprocess.CompletedProcess:
    code = ("import os; from nvdimm.lease import stop_at_once; "
            "stop_at_once('lease lost: stopping', lambda: os._exit(7), wait=0.5)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, stderr=stderr, timeout=20)


def test_a_lost_lease_stops_the_holder_even_when_stderr_is_full():
    """The server and the offline verbs stop through stop_at_once: its line is given up on
    after `wait` when stderr is a pipe nobody reads, and the holder stops regardless (a
    write blocked there would leave its other threads writing a region that may be
    someone else's)."""
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        for chunk in (65536, 1):  # fill the pipe to the last byte
            try:
                while True:
                    os.write(w, b"x" * chunk)
            except BlockingIOError:
                pass
        os.set_blocking(w, True)
        assert _stop_at_once(w).returncode == 7
    finally:
        os.close(r)
        os.close(w)
    said = _stop_at_once(subprocess.PIPE)
    assert said.returncode == 7 and said.stderr == b"lease lost: stopping\n"
