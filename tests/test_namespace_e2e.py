"""Issue 8 end to end: the ndctl-style verbs of `bttctl`, run as a subprocess against a
running server over a labelled region, with libnbd watching what clients see. Exports
appear when a namespace is created (under its name and its alt_name), disappear when it is
disabled or destroyed, come back in the other mode when it is reconfigured, and survive a
restart; connected clients hold changes off (EBUSY) unless forced, and forced, their
requests fail instead of reaching whatever is served next."""
import errno
import json
import os
import subprocess
import sys

import pytest

from conftest import MiB, pattern
from nbd_helpers import ENV, Server, connect

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_REFUSED, EXIT_USAGE = 1, 64
LIST_FIELDS = {"dev", "mode", "size", "uuid", "raw_uuid", "sector_size", "state"}


def bttctl(*args):
    return subprocess.run([sys.executable, "-m", "bttctl.main", *args], capture_output=True,
                          text=True, env=dict(ENV, PYTHONPATH=ROOT))


class Ctl:
    """bttctl VERB ... --control SOCK, with the checks every call makes."""

    def __init__(self, sock):
        self.sock = sock

    def run(self, *args):
        return bttctl(*args, "--control", self.sock)

    def ok(self, *args):
        p = self.run(*args)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
        try:
            return json.loads(p.stdout)
        except ValueError:
            return p.stdout.rstrip("\n")

    def refused(self, errname, *args, status=EXIT_REFUSED):
        """The call fails with `status`, and stderr names errno `errname`; returns stderr."""
        p = self.run(*args)
        assert p.returncode == status, (args, p.returncode, p.stdout, p.stderr)
        assert f": {errname}: " in p.stderr, (args, p.stderr)
        assert p.stdout == ""
        return p.stderr

    def listing(self, *flags):
        return {d["dev"]: d for d in self.ok("list", *flags)}

    def region(self):
        (r,) = self.ok("list", "-R", "-i")
        return r


def described(server):
    """{export name: description} as NBD_OPT_LIST gives them."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(server.sock)
    names = {}
    h.opt_list(lambda name, desc: names.__setitem__(name, desc) or 0)
    h.opt_abort()
    return names


def exports(server):
    return sorted(described(server))


def block_size(h):
    return h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED)


def assert_cut_off(h):
    """A client whose export was taken away (forced): its next request fails cleanly."""
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 0)
    assert e.value.errnum in (errno.ESHUTDOWN, errno.EIO), e.value
    h.shutdown()


def start(tmp_path, region, ctl):
    return Server(tmp_path, [region], f"control={ctl}").start(control_timeout=10)


@pytest.fixture
def served(tmp_path):
    """A server over a fresh 256 MiB labelled region with no namespaces."""
    region = str(tmp_path / "region.img")
    p = bttctl("create-region", region, "--size", "256M")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["labels"] == "1.2"
    ctl = str(tmp_path / "ctl.sock")
    s = start(tmp_path, region, ctl)
    try:
        yield s, Ctl(ctl), region
    finally:
        s.stop()


def create_db_and_raw(s, ctl):
    """namespace0.0 "db" (sector, 64 MiB raw) and namespace0.1 (raw, 512-byte, 32 MiB)."""
    db = ctl.ok("create-namespace", "--size", "64M", "--name", "db")
    raw = ctl.ok("create-namespace", "-m", "raw", "-l", "512", "-s", "32M")
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]
    return db, raw


def test_create_list_get_set(served):
    s, ctl, region = served
    assert exports(s) == [] and ctl.ok("list") == [] and ctl.ok("list", "-i") == []
    r = ctl.region()
    assert (r["size"], r["available_size"], r["labels"], r["namespaces"]) == (256 * MiB,
                                                                             256 * MiB, "1.2", [])

    # 1. a sector namespace: its export and its alias appear
    db = ctl.ok("create-namespace", "--size", "64M", "--name", "db")
    assert exports(s) == ["db", "namespace0.0"]
    assert (db["dev"], db["mode"], db["state"], db["name"]) == ("namespace0.0", "sector",
                                                                "enabled", "db")
    h = connect(s, "db")
    assert block_size(h) == (4096, 4096)
    assert 60 * MiB < h.get_size() < 64 * MiB and h.get_size() % 4096 == 0  # BTT metadata
    assert h.get_size() == db["size"]
    h.pwrite(pattern(1, 5, 4096) * 2, 5 * 4096)
    h.flush()
    h2 = connect(s, "namespace0.0")  # the same namespace under its own name
    assert h2.pread(2 * 4096, 5 * 4096) == pattern(1, 5, 4096) * 2
    assert h2.pread(4096, 0) == bytes(4096)  # a fresh BTT reads zeros
    h2.shutdown()

    # 2. a raw namespace with 512-byte sectors, beside it
    raw = ctl.ok("create-namespace", "-m", "raw", "-l", "512", "-s", "32M")
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]
    h1 = connect(s, "namespace0.1")
    assert block_size(h1) == (512, 512) and h1.get_size() == 32 * MiB
    h1.pwrite(pattern(2, 7, 512), 7 * 512)
    assert h1.pread(3 * 512, 6 * 512) == bytes(512) + pattern(2, 7, 512) + bytes(512)
    assert h.pread(2 * 4096, 5 * 4096) == pattern(1, 5, 4096) * 2  # neighbours untouched
    h1.shutdown()

    # 3. list: ndctl's field names, the BTT's uuid and size for a sector namespace
    ns = ctl.listing()
    assert set(ns) == {"namespace0.0", "namespace0.1"}
    d0, d1 = ns["namespace0.0"], ns["namespace0.1"]
    assert LIST_FIELDS | {"name", "holder"} <= set(d0)
    assert LIST_FIELDS <= set(d1) and "name" not in d1 and "holder" not in d1
    assert d0 | {"clients": 0} == db  # what create-namespace printed (h is connected since)
    assert (d0["mode"], d0["size"], d0["sector_size"], d0["name"], d0["state"],
            d0["holder"]) == ("sector", h.get_size(), 4096, "db", "enabled", "btt0.0")
    assert d0["uuid"] != d0["raw_uuid"]  # the BTT's uuid, and the namespace's
    assert (d1["mode"], d1["size"], d1["sector_size"], d1["state"]) == ("raw", 32 * MiB, 512,
                                                                       "enabled")
    assert d1["uuid"] == d1["raw_uuid"] == raw["uuid"]
    assert (d0["offset"], d0["raw_size"], d1["offset"], d1["raw_size"]) == (0, 64 * MiB,
                                                                           64 * MiB, 32 * MiB)
    assert ctl.region()["available_size"] == 160 * MiB

    # 6. get/set, like sysfs, with the kernel's errno values
    assert ctl.ok("get", "namespace0.0/holder") == "btt0.0"
    assert ctl.ok("get", "btt0.0/namespace") == "namespace0.0"
    assert ctl.ok("get", "namespace0.0/alt_name") == "db"
    assert ctl.ok("get", "namespace0.0/uuid") == d0["raw_uuid"]
    err = ctl.refused("EBUSY", "set", "namespace0.0/alt_name", "x")
    assert "claimed by btt0.0" in err
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]  # nothing changed
    assert "ENOENT" in ctl.refused("ENOENT", "get", "namespace0.0/nope")
    ctl.refused("ENODEV", "get", "namespace0.7/size")
    p = ctl.run("create-namespace", "-l", "1000")  # argparse knows the valid sizes
    assert p.returncode == EXIT_USAGE and "invalid choice: 1000" in p.stderr
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]  # nothing was created

    ctl.ok("disable-namespace", "namespace0.1")
    assert exports(s) == ["db", "namespace0.0"]
    assert ctl.ok("get", "namespace0.1/sector_size") == "[512] 4096"
    err = ctl.refused("EINVAL", "set", "namespace0.1/sector_size", "1000")
    assert "512, 4096" in err
    assert ctl.ok("set", "namespace0.1/sector_size", "4096") == "512 [4096]"
    assert ctl.ok("enable-namespace", "namespace0.1")["sector_size"] == 4096
    h1 = connect(s, "namespace0.1")
    assert block_size(h1) == (4096, 4096) and h1.get_size() == 32 * MiB
    assert h1.pread(4096, 0)[7 * 512:] == pattern(2, 7, 512)  # raw: the same bytes
    h1.shutdown()
    h.shutdown()


def test_disable_with_a_client_then_force_then_enable(served):
    s, ctl, region = served
    create_db_and_raw(s, ctl)
    h = connect(s, "db")
    h.pwrite(pattern(3, 9, 4096), 9 * 4096)

    # 4. a connected client holds a disable off...
    err = ctl.refused("EBUSY", "disable-namespace", "namespace0.0")
    assert "1 connected NBD client" in err and "force" in err
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]
    assert h.pread(4096, 9 * 4096) == pattern(3, 9, 4096)  # and was not disturbed
    assert ctl.listing()["namespace0.0"]["clients"] == 1

    # ...unless forced: its next request fails, and the export and its alias are gone
    out = ctl.ok("disable-namespace", "--force", "db")  # by alt_name
    assert (out["dev"], out["state"], out["mode"]) == ("namespace0.0", "disabled", "sector")
    assert_cut_off(h)
    assert exports(s) == ["namespace0.1"]
    for name in ("db", "namespace0.0"):
        with pytest.raises(nbd.Error):
            connect(s, name)

    # 3. list hides it; list -i shows it disabled, still in sector mode
    assert set(ctl.listing()) == {"namespace0.1"}
    d0 = ctl.listing("-i")["namespace0.0"]
    assert (d0["state"], d0["mode"], d0["name"]) == ("disabled", "sector", "db")
    assert "export" not in d0

    # enabling autodetects the BTT again: the same holder, the same data
    out = ctl.ok("enable-namespace", "namespace0.0")
    assert (out["state"], out["mode"], out["holder"]) == ("enabled", "sector", "btt0.0")
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]
    h = connect(s, "db")
    assert block_size(h) == (4096, 4096)
    assert h.pread(4096, 9 * 4096) == pattern(3, 9, 4096)
    h.shutdown()
    ctl.refused("ENODEV", "disable-namespace", "nosuch")


def test_reconfigure_switches_mode_under_a_client(served):
    s, ctl, region = served
    _, raw = create_db_and_raw(s, ctl)
    h = connect(s, "namespace0.1")
    assert block_size(h) == (512, 512)
    h.pwrite(pattern(4, 1, 512), 512)
    assert described(s)["namespace0.1"].startswith("raw mode, 512-byte sectors, 33554432 bytes")

    # 5. create-namespace -e: refused while enabled (and used) without -f
    err = ctl.refused("EBUSY", "create-namespace", "-e", "namespace0.1", "-m", "sector")
    assert "--force" in err
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]
    assert h.pread(512, 512) == pattern(4, 1, 512)

    out = ctl.ok("create-namespace", "-e", "namespace0.1", "-m", "sector", "-l", "4096", "-f")
    assert (out["dev"], out["mode"], out["sector_size"], out["holder"]) == (
        "namespace0.1", "sector", 4096, "btt0.1")
    assert out["raw_uuid"] != raw["uuid"]  # a new namespace in the old one's place
    assert_cut_off(h)  # the old raw client never reaches the new BTT
    desc = described(s)
    assert desc["namespace0.1"].startswith(f"sector mode, 4096-byte sectors, {out['size']} bytes")
    assert desc["db"].startswith("alias of namespace0.0: sector mode")
    h = connect(s, "namespace0.1")
    assert block_size(h) == (4096, 4096)
    assert h.get_size() == out["size"] and 16 * MiB < h.get_size() < 32 * MiB
    h.pwrite(pattern(5, 2, 4096), 2 * 4096)
    assert h.pread(4096, 2 * 4096) == pattern(5, 2, 4096)

    # and back to raw: -l carries forward (as ndctl does) unless given
    out = ctl.ok("create-namespace", "-e", "namespace0.1", "-m", "raw", "-f")
    assert (out["mode"], out["sector_size"], out["size"]) == ("raw", 4096, 32 * MiB)
    assert "holder" not in out
    assert_cut_off(h)
    h = connect(s, "namespace0.1")
    assert block_size(h) == (4096, 4096) and h.get_size() == 32 * MiB
    h.shutdown()
    assert ctl.listing()["namespace0.0"]["holder"] == "btt0.0"  # the neighbour is untouched
    # a bad size is refused before anything is torn down, even forced
    err = ctl.refused("EINVAL", "create-namespace", "-e", "namespace0.1", "-s", "24M", "-f")
    assert str(16 * MiB) in err  # names the region's alignment
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]
    h = connect(s, "namespace0.1")
    assert h.get_size() == 32 * MiB
    h.shutdown()


def test_destroy_namespace(served):
    s, ctl, region = served
    create_db_and_raw(s, ctl)
    assert ctl.region()["available_size"] == 160 * MiB
    h = connect(s, "namespace0.1")

    # 7. an enabled namespace is not destroyed without --force
    err = ctl.refused("EBUSY", "destroy-namespace", "namespace0.1")
    assert "--force" in err
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]

    out = ctl.ok("destroy-namespace", "--force", "namespace0.1")
    assert out == {"dev": "namespace0.1", "destroyed": True}
    assert_cut_off(h)
    assert exports(s) == ["db", "namespace0.0"]
    assert set(ctl.listing("-i")) == {"namespace0.0"}
    r = ctl.region()
    assert r["available_size"] == 192 * MiB and [n["dev"] for n in r["namespaces"]] == [
        "namespace0.0"]
    ctl.refused("ENODEV", "destroy-namespace", "namespace0.1")  # it is gone

    # a disabled namespace needs no --force; by alt_name; the region is empty again
    ctl.ok("disable-namespace", "db")
    assert ctl.ok("destroy-namespace", "db") == {"dev": "namespace0.0", "destroyed": True}
    assert exports(s) == [] and ctl.ok("list", "-i") == []
    assert ctl.region()["available_size"] == 256 * MiB

    # the freed capacity is handed out again, and the new namespace starts blank
    out = ctl.ok("create-namespace", "-s", "64M", "-n", "db2")
    assert (out["offset"], out["mode"], out["name"]) == (0, "sector", "db2")
    assert exports(s) == sorted(["db2", out["dev"]])
    h = connect(s, "db2")
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


def test_create_after_destroying_everything_reuses_namespace0_0(served):
    s, ctl, region = served
    create_db_and_raw(s, ctl)
    ctl.ok("destroy-namespace", "-f", "namespace0.1")
    ctl.ok("destroy-namespace", "-f", "namespace0.0")
    assert exports(s) == []
    out = ctl.ok("create-namespace", "-s", "64M")
    assert out["dev"] == "namespace0.0"
    assert exports(s) == ["namespace0.0"]


def test_restart_and_offline(served, tmp_path):
    s, ctl, region = served
    db, raw = create_db_and_raw(s, ctl)
    h = connect(s, "db")
    h.pwrite(pattern(6, 3, 4096), 3 * 4096)
    h.shutdown()
    h = connect(s, "namespace0.1")
    h.pwrite(pattern(7, 11, 512), 11 * 512)
    h.shutdown()
    before = ctl.listing()

    # 9. offline on a served file: the server holds the region's lock
    p = bttctl("list", "--region", region)
    assert p.returncode == EXIT_REFUSED, (p.returncode, p.stderr)
    assert "EBUSY" in p.stderr and "served by another process" in p.stderr
    assert "--control" in p.stderr and p.stdout == ""
    assert exports(s) == ["db", "namespace0.0", "namespace0.1"]  # the server did not notice

    # 8. restart: the labels and the BTTs bring everything back, names and uuids included
    s.stop()
    p = bttctl("list", "--region", region)  # offline works once nobody holds the lock
    assert p.returncode == 0, p.stderr
    off = {d["dev"]: d for d in json.loads(p.stdout)}
    assert set(off) == {"namespace0.0", "namespace0.1"}
    assert {d["state"] for d in off.values()} == {"enabled"}  # what a server would do
    assert (off["namespace0.0"]["mode"], off["namespace0.0"]["name"]) == ("sector", "db")
    assert off["namespace0.1"]["mode"] == "raw"
    for dev in off:
        assert off[dev]["raw_uuid"] == before[dev]["raw_uuid"]
        assert off[dev]["sector_size"] == before[dev]["sector_size"]
    p = bttctl("get", "--region", region, "namespace0.0/alt_name")
    assert (p.returncode, p.stdout) == (0, "db\n")

    ctl2 = Ctl(str(tmp_path / "ctl2.sock"))
    s2 = start(tmp_path, region, ctl2.sock)
    try:
        assert exports(s2) == ["db", "namespace0.0", "namespace0.1"]
        after = ctl2.listing()
        for dev in before:  # the BTT's uuid, holder, name, sizes, offsets
            assert after[dev] | {"clients": 0} == before[dev] | {"clients": 0}, dev
        h = connect(s2, "db")
        assert block_size(h) == (4096, 4096) and h.get_size() == db["size"]
        assert h.pread(4096, 3 * 4096) == pattern(6, 3, 4096)
        h.shutdown()
        h = connect(s2, "namespace0.1")
        assert block_size(h) == (512, 512) and h.get_size() == 32 * MiB
        assert h.pread(512, 11 * 512) == pattern(7, 11, 512)
        h.shutdown()
    finally:
        s2.stop()


def test_kill_9_loses_no_acknowledged_write_in_a_namespace_further_in(served, tmp_path):
    """group durability in a namespace at offset 64 MiB (its intent journal is
    REGION.journal.OFFSET): kill -9 right after acknowledged, unflushed writes loses none."""
    import signal
    s, ctl, region = served
    ctl.ok("create-namespace", "--size", "64M", "--name", "first")
    second = ctl.ok("create-namespace", "--size", "64M", "--name", "second")
    assert second["offset"] == 64 * MiB
    h = connect(s, "second")
    for i in range(40):
        h.pwrite(pattern(11, i, 4096), (i * 7 % 300) * 4096)
    s.stop(signal.SIGKILL)  # no flush, no clean close
    assert os.path.exists(f"{region}.journal.{64 * MiB}")
    s2 = start(tmp_path, region, str(tmp_path / "ctl2.sock"))
    try:
        h = connect(s2, "second")
        expected = {}
        for i in range(40):
            expected[(i * 7 % 300)] = pattern(11, i, 4096)
        for lba, data in expected.items():
            assert h.pread(4096, lba * 4096) == data, lba
        h.shutdown()
    finally:
        s2.stop()


def test_a_destroyed_namespaces_clients_do_not_haunt_its_successor(served):
    """Review finding: the connection count of a force-destroyed namespace stayed on its
    name, so the next namespace under that name refused disable with EBUSY."""
    s, ctl, region = served
    ctl.ok("create-namespace", "--size", "32M", "-m", "raw")
    h = connect(s, "namespace0.0")
    ctl.ok("destroy-namespace", "-f", "namespace0.0")
    again = ctl.ok("create-namespace", "--size", "32M", "-m", "raw")
    assert (again["dev"], again["clients"]) == ("namespace0.0", 0)
    ctl.ok("disable-namespace", "namespace0.0")
    with pytest.raises(nbd.Error):  # the old client stays cut off
        h.pread(4096, 0)
    h.shutdown()


def test_check_namespace_force_leaves_connected_clients_alone(served):
    s, ctl, region = served
    ctl.ok("create-namespace", "--size", "32M", "--name", "db")
    h = connect(s, "db")
    p = ctl.run("check-namespace", "db", "--force")
    assert p.returncode == EXIT_REFUSED and "EBUSY" in p.stderr and "connected" in p.stderr
    h.pwrite(pattern(3, 0, 4096), 0)  # still served
    h.shutdown()
    p = ctl.run("check-namespace", "db", "--force")
    assert p.returncode == 0, p.stdout + p.stderr
