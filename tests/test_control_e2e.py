"""The control socket of a running server, driven by bttctl, watched by libnbd: exports
disappear and come back, connected clients hold a disable off (EBUSY) unless forced, and
check-namespace works on a served namespace."""
import errno
import json
import os
import subprocess
import sys

import pytest

from btt_core import Btt

from conftest import MiB, pattern
from nbd_helpers import ENV, Server, connect

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bttctl(*args):
    return subprocess.run([sys.executable, "-m", "bttctl.main", *args], capture_output=True,
                          text=True, env=dict(ENV, PYTHONPATH=ROOT))


def exports(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(server.sock)
    names = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    h.opt_abort()
    return names


@pytest.fixture
def served(tmp_path):
    region = str(tmp_path / "region.img")
    Btt.create(region, size=64 * MiB).close()
    ctl = str(tmp_path / "ctl.sock")
    with Server(tmp_path, [region], f"control={ctl}") as s:
        yield s, ctl, region


def test_list_disable_enable(served):
    s, ctl, region = served
    p = bttctl("list", "--control", ctl)
    assert p.returncode == 0, p.stderr
    (ns,) = json.loads(p.stdout)
    assert ns["dev"] == "namespace0.0" and ns["mode"] == "sector" and ns["state"] == "enabled"
    assert ns["sector_size"] == 4096 and ns["uuid"] and ns["holder"] == "btt0.0"

    assert "stats" not in ns
    (ns,) = json.loads(bttctl("list", "--stats", "--control", ctl).stdout)
    assert ns["durability"] == "group" and ns["stats"]["writes"] == 0

    h = connect(s)
    h.pwrite(pattern(1, 3, 4096), 3 * 4096)
    h.flush()
    (ns,) = json.loads(bttctl("list", "--stats", "--control", ctl).stdout)
    assert ns["stats"]["writes"] == 1 and ns["stats"]["commits"] >= 1  # the flush committed
    assert ns["stats"]["syncs"] >= 2
    p = bttctl("disable-namespace", "namespace0.0", "--control", ctl)
    assert p.returncode == 1 and "EBUSY" in p.stderr  # a client is connected
    assert exports(s) == ["namespace0.0"]
    p = bttctl("disable-namespace", "namespace0.0", "--force", "--control", ctl)
    assert p.returncode == 0 and json.loads(p.stdout)["state"] == "disabled"
    with pytest.raises(nbd.Error) as e:  # the connected client's next request fails cleanly
        h.pread(4096, 3 * 4096)
    assert e.value.errnum in (errno.ESHUTDOWN, errno.EIO)
    assert exports(s) == []
    with pytest.raises(nbd.Error):
        connect(s)
    h.shutdown()

    p = bttctl("enable-namespace", "namespace0.0", "--control", ctl)
    assert p.returncode == 0 and json.loads(p.stdout)["state"] == "enabled"
    assert exports(s) == ["namespace0.0"]
    h = connect(s)
    assert h.pread(4096, 3 * 4096) == pattern(1, 3, 4096)  # nothing lost across the disable
    h.shutdown()


def test_unknown_namespace_and_bad_requests(served):
    s, ctl, region = served
    p = bttctl("disable-namespace", "namespace9.9", "--control", ctl)
    assert p.returncode == 1 and "ENODEV" in p.stderr and "namespace0.0" in p.stderr
    p = bttctl("list", "--control", str(s.sock) + ".nope")
    assert p.returncode == 64 and "bttctl serve" in p.stderr


def test_check_namespace_of_a_running_server(served):
    s, ctl, region = served
    p = bttctl("check-namespace", "namespace0.0", "--control", ctl)
    assert p.returncode == 1 and "EBUSY" in p.stderr  # refused, as every EBUSY
    p = bttctl("check-namespace", "namespace0.0", "--control", ctl, "--force", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["status"] == 0
    assert exports(s) == ["namespace0.0"]  # enabled again
    bttctl("disable-namespace", "namespace0.0", "--control", ctl)
    with open(region, "r+b") as f:  # damage it while disabled
        f.seek(4096)
        f.write(bytes(4096))
    p = bttctl("enable-namespace", "namespace0.0", "--control", ctl)
    assert p.returncode == 1 and "EUCLEAN" in p.stderr and "--repair" in p.stderr  # not raw!
    p = bttctl("check-namespace", "namespace0.0", "--control", ctl, "--repair")
    assert p.returncode == 2, p.stdout + p.stderr
    assert bttctl("enable-namespace", "namespace0.0", "--control", ctl).returncode == 0
    p = bttctl("read-infoblock", "namespace0.0", "--control", ctl, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)[0]["arenas"][0]["backup_matches"]


def test_socket_abuse_leaves_server_and_state_intact(served):
    """Random bytes, a huge line, junk requests, many clients and abrupt disconnects against
    the real handler: the server keeps serving, and namespaces and exports are unchanged."""
    import random
    import socket
    import threading

    from control.server import request
    s, ctl, region = served
    before = request(ctl, {"op": "list", "idle": True})["result"]
    rng = random.Random(8)
    failures = []

    def abuse(i):
        try:
            attack(i)
        except Exception as e:  # noqa: BLE001 - a thread's exception would only warn
            failures.append(f"client {i}: {e!r}")

    def attack(i):
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(5)
            c.connect(ctl)
            kind = i % 4
            if kind == 0:
                c.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4096))))
            elif kind == 1:
                c.sendall(b'{"op": "list", "pad": "' + b"x" * (200 << 10))  # over the limit
            elif kind == 2:
                junk = [{"op": "set", "path": "namespace0.0/size", "value": None},
                        {"op": "create-namespace", "size": -1}, {"op": ["list"]},
                        {"op": "disable-namespace", "namespace": {"x": 1}},
                        {"op": "get", "path": "../../etc/passwd"}, [1, 2], "list", 7]
                c.sendall(b"".join(json.dumps(j).encode() + b"\n" for j in junk))
                replies = c.makefile("rb")
                for _ in junk:
                    reply = json.loads(replies.readline())
                    assert reply["ok"] is False and reply["errno"] != "EIO", reply
            # kind 3: connect and hang up at once

    threads = [threading.Thread(target=abuse, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # A server that hung up on an over-long line may reset a client still sending.
    assert not [f for f in failures if "Connection" not in f and "Broken" not in f], failures
    assert request(ctl, {"op": "list", "idle": True})["result"] == before
    assert exports(s) == ["namespace0.0"]
    h = connect(s)
    h.pwrite(pattern(9, 1, 4096), 4096)
    assert h.pread(4096, 4096) == pattern(9, 1, 4096)
    h.shutdown()


def test_nested_json_line_is_answered_not_a_traceback(served):
    import socket
    s, ctl, region = served
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(ctl)
        c.sendall(b"[" * 60000 + b"\n")  # within the 64 KiB line limit
        reply = json.loads(c.makefile("rb").readline())
    assert reply["errno"] == "EINVAL" and "nested too deeply" in reply["error"]
    assert json.loads(bttctl("list", "--control", ctl).stdout)[0]["dev"] == "namespace0.0"
    assert "Traceback" not in s.output() and "RecursionError" not in s.output()
