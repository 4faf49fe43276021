"""Control socket transport: permissions, peer credentials, malformed/huge/slow input,
many clients, abrupt disconnects, serialisation."""
import errno
import json
import os
import random
import socket
import stat
import threading
import time

import pytest

from btt_core.errors import ErrnoError
from control.server import ControlServer, private_socket_dir, request


class Counter:
    """A handler with state that must never be half-updated under concurrency."""

    def __init__(self):
        self.a = self.b = 0

    def __call__(self, req):
        op = req.get("op")
        if op == "inc":
            a = self.a
            time.sleep(0.0005)  # widen the window a missing lock would expose
            self.a, self.b = a + 1, self.b + 1
            return {"a": self.a}
        if op == "get":
            return {"a": self.a, "b": self.b}
        if op == "busy":
            raise ErrnoError(errno.EBUSY, "namespace0.0 is claimed by btt0.0")
        if op == "bug":
            raise KeyError("oops")
        if op == "unencodable":
            return {"a": {1, 2}}  # a set: json cannot encode the reply
        raise ErrnoError(errno.EINVAL, f"unknown op {op!r}; valid: inc, get, busy")


@pytest.fixture
def server():
    d = private_socket_dir()
    srv = ControlServer(os.path.join(d, "control.sock"), Counter(), request_timeout=1.0)
    srv.start()
    yield srv
    srv.stop()
    os.rmdir(d)


def raw(path, payload, read=True, timeout=5):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    for _ in range(100):  # a flood may fill the listen backlog: EAGAIN, try again
        try:
            s.connect(path)
            break
        except BlockingIOError:
            time.sleep(0.01)
    s.sendall(payload)
    out = b""
    if read:
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                if out.endswith(b"\n") and out.count(b"\n") >= payload.count(b"\n"):
                    break
        except socket.timeout:
            pass
    s.close()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_socket_is_private(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o700


def test_request_reply_and_errors(server):
    assert request(server.path, {"id": 7, "op": "inc"}) == {"id": 7, "ok": True, "result": {"a": 1}}
    r = request(server.path, {"id": 8, "op": "busy"})
    assert r["ok"] is False and r["errno"] == "EBUSY" and r["code"] == errno.EBUSY
    r = request(server.path, {"op": "nope"})
    assert r["errno"] == "EINVAL" and "valid: inc" in r["error"]
    r = request(server.path, {"op": "bug"})
    assert r["errno"] == "EIO" and "internal error" in r["error"]
    assert request(server.path, {"op": "get"})["result"] == {"a": 1, "b": 1}


def test_malformed_lines_get_errors_and_the_connection_goes_on(server):
    replies = raw(server.path, b'not json\n[1,2]\n\xff\xfe\n{"op":"get"}\n')
    assert [r["ok"] for r in replies] == [False, False, False, True]
    assert all(r["errno"] == "EINVAL" for r in replies[:3])


def test_huge_line_refused(server):
    replies = raw(server.path, b"x" * (200 * 1024))
    assert replies and replies[0]["errno"] == "E2BIG"
    assert request(server.path, {"op": "get"})["ok"]


def test_slow_client_times_out(server):
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.path)
    s.sendall(b'{"op": "ge')
    s.settimeout(5)
    reply = json.loads(s.recv(65536).splitlines()[0])
    assert reply["errno"] == "ETIMEDOUT"
    assert s.recv(10) == b""  # closed
    s.close()


def test_fuzz_random_bytes_and_abrupt_disconnects(server):
    rng = random.Random(5)
    for _ in range(200):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        if rng.random() < 0.5:
            payload += b"\n"
        raw(server.path, payload, read=payload.endswith(b"\n") and rng.random() < 0.3, timeout=0.5)
    assert request(server.path, {"op": "get"})["ok"]


def test_many_concurrent_clients_are_serialised(server):
    def worker():
        for _ in range(20):
            assert request(server.path, {"op": "inc"})["ok"]

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert request(server.path, {"op": "get"})["result"] == {"a": 200, "b": 200}


def test_other_uid_refused(server):
    if os.getuid() != 0:
        pytest.skip("needs root to act as another uid")
    os.chmod(os.path.dirname(server.path), 0o755)  # let the other uid reach the socket...
    os.chmod(server.path, 0o666)  # ...so the refusal tested is the credential check
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                reply = request(server.path, {"op": "inc"})
            except Exception as e:  # noqa: BLE001 - report it to the parent's assertion
                reply = {"child failed": repr(e)}
            os.write(w, json.dumps(reply).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    reply = json.loads(os.read(r, 65536))
    assert reply.get("ok") is False and reply["errno"] == "EACCES", reply
    assert request(server.path, {"op": "get"})["result"]["a"] == 0


def test_a_live_socket_is_not_taken_over(server):
    """A second server on the same path must not unlink the first one's live socket (the
    first would keep running, unreachable); a stale file from a killed server is replaced."""
    second = ControlServer(server.path, Counter())
    with pytest.raises(OSError) as e:
        second.start()
    assert e.value.errno == errno.EADDRINUSE
    assert request(server.path, {"op": "get"})["ok"]
    stale = os.path.join(os.path.dirname(server.path), "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # the file stays, nobody listens
    third = ControlServer(stale, Counter())
    third.start()
    try:
        assert request(stale, {"op": "get"})["ok"]
    finally:
        third.stop()


@pytest.mark.parametrize("kind", ["regular file", "symbolic link", "directory"])
def test_only_a_stale_socket_is_replaced(tmp_path, kind):
    """Whatever is at the path but a socket is left exactly as it was, and start refuses
    with one line naming the path and what is there."""
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"keep me\n")
    path = tmp_path / "control.sock"
    {"regular file": lambda: path.write_bytes(b"keep me too\n"),
     "symbolic link": lambda: path.symlink_to(precious),
     "directory": path.mkdir}[kind]()
    srv = ControlServer(str(path), Counter())
    with pytest.raises(OSError) as e:
        srv.start()
    assert e.value.errno == errno.EEXIST and kind in str(e.value) and str(path) in str(e.value)
    assert os.path.lexists(path) and precious.read_bytes() == b"keep me\n"
    if kind == "regular file":
        assert path.read_bytes() == b"keep me too\n"


def test_stop_removes_only_the_socket_it_bound(tmp_path):
    path = tmp_path / "control.sock"
    srv = ControlServer(str(path), Counter())
    srv.start()
    os.rename(path, tmp_path / "moved.sock")
    path.write_bytes(b"someone else's\n")  # taken over while we ran
    srv.stop()
    assert path.read_bytes() == b"someone else's\n"
    srv = ControlServer(str(tmp_path / "other.sock"), Counter())
    srv.start()
    srv.stop()
    assert not (tmp_path / "other.sock").exists()


def test_over_long_line_refused_even_with_its_newline(server):
    """The limit holds whether or not the newline came in the same read."""
    line = b'{"op": "get", "pad": "' + b"x" * (server.max_line + 10) + b'"}\n'
    replies = raw(server.path, line)
    assert replies and replies[0]["errno"] == "E2BIG"
    assert request(server.path, {"op": "get"})["ok"]


def test_a_trickling_client_is_cut_off_at_the_deadline(server):
    """request_timeout (1 s here) is for the whole request: a byte every 0.3 s, which no
    per-recv timeout would ever catch, is cut off after the deadline."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(server.path)
    s.settimeout(0.05)
    start = time.monotonic()
    got = b""
    try:
        for b in b'{"op": "get", "pad": "' + b"x" * 100:
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            try:
                got += s.recv(65536)
            except socket.timeout:
                pass
            if got or time.monotonic() - start > 10:
                break
            time.sleep(0.3)
        if not got:  # the server hung up before we read its reply
            s.settimeout(2)
            got = s.recv(65536)
    finally:
        s.close()
    assert json.loads(got.splitlines()[0])["errno"] == "ETIMEDOUT"
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("payload", [b"[" * 60000, b'{"a":' * 12000, b"[" * 2000 + b"]" * 2000])
def test_deep_nesting_gets_a_json_error(server, payload):
    replies = raw(server.path, payload + b"\n")
    assert replies and replies[0]["errno"] == "EINVAL" and "JSON" in replies[0]["error"]
    assert request(server.path, {"op": "get"})["ok"]


def test_an_unencodable_reply_is_an_error_reply_not_a_dead_thread(server):
    first, second = raw(server.path, b'{"op": "unencodable"}\n{"op": "get"}\n')
    assert first["ok"] is False and "cannot be encoded" in first["error"]
    assert second["ok"] is True  # the client's connection was still served


def test_a_live_socket_with_a_full_backlog_is_not_stale(tmp_path):
    """A listener that is too busy to accept (its backlog full: connect says EAGAIN) is a
    live server; only a refused connection makes a socket stale."""
    from control.sockets import clear_socket_path
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    queued = []
    try:
        for _ in range(4):  # fill the backlog
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(path)
            except BlockingIOError:
                c.close()
                break
            queued.append(c)
        with pytest.raises(OSError) as e:
            clear_socket_path(path, "control socket")
        assert "in use" in str(e.value)
        assert os.path.exists(path)
    finally:
        for c in queued:
            c.close()
        listener.close()
