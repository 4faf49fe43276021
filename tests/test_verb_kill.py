"""kill -9 of a real server in the middle of create-namespace and destroy-namespace sent
over its control socket (issue 16, item 3). After each kill the server is restarted on the
same region file: the namespaces it shows must be exactly the old set or the new one, all
of them enabled (a sector namespace with a valid BTT), and the other namespaces' data as
written. The recorded-write crash states of the same verbs are in test_verb_crash.py."""
import os
import random
import shutil
import signal
import threading
import time

import pytest

from control.server import request
from nvdimm.labels import LabelArea

from conftest import MiB, pattern
from nbd_helpers import Server, connect

nbd = pytest.importorskip("nbd")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")]


# Every fdatasync is held up 40 ms (strace's fault injection), so a verb takes a few
# hundred ms and a kill at a random moment lands inside it, between its writes.
SLOW_SYNCS = ("strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync,fsync",
              "-e", "inject=fdatasync,fsync:delay_exit=40000")


def start(tmp_path, region, ctl):
    if os.path.exists(ctl):
        os.unlink(ctl)  # left by the killed server
    return Server(tmp_path, [region], f"control={ctl}", wrap=SLOW_SYNCS).start()


def listing(ctl):
    reply = request(ctl, {"op": "list", "idle": True})
    assert reply["ok"], reply
    return {n["raw_uuid"]: (n.get("name", ""), n["offset"], n["raw_size"], n["mode"],
                            n["state"]) for n in reply["result"]}


def write_keepers(s):
    for export, tag in (("keep", 1), ("plain", 2)):
        h = connect(s, export)
        for lba in (0, 7):
            h.pwrite(pattern(tag, lba, 4096), lba * 4096)
        h.flush()
        h.shutdown()


def assert_keepers(s):
    for export, tag in (("keep", 1), ("plain", 2)):
        h = connect(s, export)
        for lba in (0, 7):
            assert h.pread(4096, lba * 4096) == pattern(tag, lba, 4096), export
        h.shutdown()


LONG = bool(os.environ.get("BTT_LONG"))


@pytest.mark.parametrize("seed, cycles", [(1, 4), pytest.param(2, 40, marks=[
    pytest.mark.long, pytest.mark.skipif(not LONG, reason="make test-long (BTT_LONG=1)")])])
def test_kill_9_during_create_and_destroy(tmp_path, seed, cycles):
    rng = random.Random(seed)
    region = str(tmp_path / "region.img")
    LabelArea.create(region, 128 * MiB).close()
    ctl = str(tmp_path / "ctl.sock")
    s = start(tmp_path, region, ctl)
    try:
        for req in ({"size": "32M", "name": "keep"},
                    {"size": "16M", "name": "plain", "mode": "raw", "sector_size": 4096}):
            reply = request(ctl, {"op": "create-namespace", "mode": "sector", **req})
            assert reply["ok"], reply
        write_keepers(s)
        outcomes = {"old": 0, "new": 0, "no reply (killed mid-verb)": 0}
        for cycle in range(cycles):
            old = listing(ctl)
            victim = [u for u, n in old.items() if n[0] == "victim"]
            if victim:
                req = {"op": "destroy-namespace", "namespace": "victim", "force": True}
            else:
                req = {"op": "create-namespace", "mode": "sector", "size": "16M",
                       "name": "victim"}
            replies = []
            worker = threading.Thread(target=lambda replies=replies, req=req:
                                      replies.append(_try(request, ctl, req)))
            worker.start()
            time.sleep(rng.uniform(0, 0.4))
            kill_9(s)
            worker.join(30)
            outcomes["no reply (killed mid-verb)"] += replies == [None]
            s.stop()
            s = start(tmp_path, region, ctl)
            got = listing(ctl)
            assert all(n[4] == "enabled" for n in got.values()), (cycle, req, got,
                                                                  s.output()[-1500:])
            if got == old:
                outcomes["old"] += 1
            else:
                outcomes["new"] += 1
                others = {u: n for u, n in got.items() if n[0] != "victim"}
                assert others == {u: n for u, n in old.items() if n[0] != "victim"}, (old, got)
                made = [n for n in got.values() if n[0] == "victim"]
                if victim:
                    assert made == [], (cycle, old, got)
                else:
                    assert [(n[2], n[3]) for n in made] == [(16 * MiB, "sector")], (old, got)
            assert_keepers(s)
        print(f"\nkill -9 verb cycles: {outcomes}")
    finally:
        s.stop()


def kill_9(s):
    """SIGKILL to nbdkit itself (strace would detach and let it run on), then reap."""
    with open(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    s.proc.wait(30)


def _try(fn, *args):
    try:
        return fn(*args)
    except OSError:
        return None  # the server died under the request
