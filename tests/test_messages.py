"""Messages that misled a new user (issue 16, item 12): each says what happened, with its
errno, in one line."""
import os
import subprocess
import sys

import pytest

from bttctl.namespace import call_offline
from control.server import request
from nvdimm.labels import LabelArea

import testbuild
from conftest import MiB
from nbd_helpers import ENV, ROOT, Server

BTTCTL = [sys.executable, "-m", "bttctl.main"]


def bttctl(*args, cwd=None):
    return subprocess.run([*BTTCTL, *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(ENV, PYTHONPATH=ROOT))


@pytest.fixture
def region(tmp_path):
    path = str(tmp_path / "region.img")
    LabelArea.create(path, 128 * MiB).close()
    return path


def test_a_full_region_says_what_is_free_and_what_was_asked(region):
    """Was: `no region has None bytes free`."""
    assert call_offline([region], {"op": "create-namespace", "size": "96M"})["ok"]
    assert call_offline([region], {"op": "create-namespace"})["ok"]  # the remaining 32 MiB
    for size, asked in ((None, "largest free extent"), ("64M", f"{64 * MiB} bytes")):
        req = {"op": "create-namespace", **({"size": size} if size else {})}
        reply = call_offline([region], req)
        assert reply["errno"] == "ENOSPC", reply
        assert "None" not in reply["error"] and asked in reply["error"]
        assert "region0 0 bytes" in reply["error"]


@pytest.mark.e2e
def test_create_on_a_read_only_server_is_erofs(tmp_path, region):
    """Was: ENXIO, `no labelled, writable region ... label-less files hold one namespace`."""
    ctl = str(tmp_path / "nbd.ctl")
    call_offline([region], {"op": "create-namespace", "size": "32M"})
    with Server(tmp_path, [region], "readonly=on", f"control={ctl}", readonly=True):
        r = bttctl("create-namespace", "--control", ctl, "--size", "32M")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "EROFS" in r.stderr and "read-only" in r.stderr and "label-less" not in r.stderr


@pytest.mark.e2e
def test_check_namespace_on_a_served_file_is_ebusy_exit_1(tmp_path, region):
    """Was: exit 64 (a usage error) with no errno, where every other EBUSY exits 1."""
    call_offline([region], {"op": "create-namespace", "size": "32M", "name": "db"})
    ctl = str(tmp_path / "nbd.ctl")
    with Server(tmp_path, [region], f"control={ctl}"):
        for argv in (("check-namespace", "--region", region, "db"),  # the file is locked
                     ("check-namespace", "--repair", region, "--size", str(32 * MiB)),
                     ("check-namespace", "--control", ctl, "db")):  # enabled
            r = bttctl(*argv)
            assert r.returncode == 1, (argv, r.returncode, r.stderr)
            assert "EBUSY" in r.stderr and r.stderr.count("\n") == 1, r.stderr


KILLED_IN_A_COMMIT = """
import os, signal, sys
from btt_core import Btt
from testbuild import commit_step
b = Btt.open(sys.argv[1], durability="group")
for i in range(40):
    b.write(i, bytes([i + 1]) * 4096)
for _ in range(4):  # begin the group commit: barrier, flog, barrier; the map is not written
    commit_step(b)
for i in range(40, 60):  # staged in the next epoch: in the intent journal only
    b.write(i, bytes([i + 1]) * 4096)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_check_after_a_kill_in_group_mode_counts_what_the_next_open_recovers(tmp_path):
    """Was: "40 problem(s) left", exit 1, for writes the next open completes (a log entry
    ahead of its map entry) and not a word on the 20 the journal replays. Now both are
    notes, exit 0; --repair does the recovery now, exit 2; then the check is clean."""
    from btt_core import Btt
    path = str(tmp_path / "disk.img")
    Btt.create(path, size=64 * MiB).close()
    # The test build: commit_step reaches inside the engine (tests/testbuild.py).
    env = dict(ENV, PYTHONPATH=f"{ROOT}:{os.path.join(ROOT, 'tests')}", **testbuild.env())
    p = subprocess.run([sys.executable, "-c", KILLED_IN_A_COMMIT, path], env=env,
                       capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]  # killed itself inside the commit
    assert os.path.exists(path + ".journal")
    r = bttctl("check-namespace", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "problem" not in r.stdout and "the next open completes" in r.stdout
    assert "20 write(s) acknowledged before a crash are in the intent journal" in r.stdout
    assert r.stdout.count("note: arena 0: interrupted-write") >= 1
    r = bttctl("check-namespace", "--repair", path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "20 journaled write(s) replayed" in r.stdout
    assert not os.path.exists(path + ".journal")
    r = bttctl("check-namespace", path)
    assert (r.returncode, r.stdout.splitlines()[-1]) == (0, "result: clean"), r.stdout
    with Btt.open(path, readonly=True) as b:
        for i in range(60):
            assert b.read(i, 1) == bytes([i + 1]) * 4096, i


def digest(path):
    with open(path, "rb") as f:
        return hash(f.read())


def test_offline_list_shows_what_a_server_would_do(tmp_path, region):
    """Was: every namespace "disabled" offline, where a server enables them all."""
    for args in (("--size", "32M", "--name", "db"), ("-m", "raw", "--size", "32M"),
                 ("--size", "32M", "--name", "gone")):
        assert bttctl("create-namespace", "--region", region, *args).returncode == 0
    listed = {n["dev"]: n for n in call_offline([region], {"op": "list"})["result"]}
    with open(region, "r+b") as f:  # the label says sector, but the BTT is wiped
        f.seek(listed["namespace0.2"]["offset"])
        f.write(bytes(8192))
    before = digest(region)
    r = bttctl("list", "--region", region)
    assert r.returncode == 0, r.stderr
    import json
    got = {n["dev"]: n for n in json.loads(r.stdout)}
    assert (got["namespace0.0"]["state"], got["namespace0.0"]["mode"]) == ("enabled", "sector")
    assert (got["namespace0.1"]["state"], got["namespace0.1"]["mode"]) == ("enabled", "raw")
    refused = got["namespace0.2"]
    assert refused["state"] == "disabled" and "EUCLEAN" in refused["refused"], refused
    assert "check-namespace" in refused["refused"]
    assert digest(region) == before  # looking changed nothing


@pytest.mark.parametrize("verb", ["enable-namespace", "disable-namespace"])
def test_offline_enable_and_disable_are_refused(region, verb):
    """Was: exit 0 and nothing changed (enabled is not kept on media)."""
    assert bttctl("create-namespace", "--region", region, "--size", "32M", "--name",
                  "db").returncode == 0
    before = digest(region)
    r = bttctl(verb, "--region", region, "db")
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r
    assert "EOPNOTSUPP" in r.stderr and "--control" in r.stderr
    assert digest(region) == before


@pytest.mark.e2e
def test_failed_requests_are_one_log_line(tmp_path):
    """Was: a Python traceback in the server log for every misaligned request, and for each
    request of a client whose namespace was disabled under it (item 10)."""
    import nbd

    from btt_core import Btt

    from nbd_helpers import connect
    path = str(tmp_path / "disk.img")
    Btt.create(path, size=64 * MiB).close()
    ctl = str(tmp_path / "nbd.ctl")
    with Server(tmp_path, [path], f"control={ctl}") as s:
        h = connect(s, strict=False)
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 512, 0)
        assert e.value.errno == "EINVAL"
        assert request(ctl, {"op": "disable-namespace", "namespace": "namespace0.0",
                             "force": True})["ok"]
        for call in (lambda: h.pread(4096, 0), lambda: h.zero(4096, 0), h.flush):
            with pytest.raises(nbd.Error) as e:
                call()
            assert e.value.errno == "ESHUTDOWN"
        h.shutdown()
        log = s.output()
    assert "Traceback" not in log, log
    assert log.count("EINVAL: request [0, +512) is not aligned") == 1, log
    assert log.count("ESHUTDOWN: the namespace has been disabled") == 3, log
