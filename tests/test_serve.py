"""`bttctl serve` end to end: default region, URI, nbdinfo, Ctrl-C; TCP on localhost."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from nbd_helpers import ENV

pytestmark = pytest.mark.e2e
BTTCTL = [sys.executable, "-m", "bttctl.main"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_serve(cwd, *args):
    env = dict(ENV, PYTHONPATH=ROOT)
    p = subprocess.Popen([*BTTCTL, "serve", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    assert line, p.stderr.read()
    return p, line


def test_serve_defaults_then_ctrl_c(tmp_path):
    p, uri = start_serve(tmp_path)
    try:
        assert uri == f"nbd+unix:///demo?socket={tmp_path}/var/nbd.sock"  # by its alt_name
        # A labelled 1 GiB region (plus its 128 KiB label area) with a 512 MiB BTT namespace.
        assert (tmp_path / "var" / "region0.img").stat().st_size == (1 << 30) + (128 << 10)
        info = subprocess.run(["nbdinfo", uri], env=ENV, capture_output=True, text=True, check=True)
        assert "block_size_minimum: 4096" in info.stdout and "export-size: 535269376" in info.stdout
        info = subprocess.run(["nbdinfo", "--list", uri], env=ENV, capture_output=True, text=True,
                              check=True)
        assert "export=\"namespace0.0\"" in info.stdout and "export=\"demo\"" in info.stdout
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(20)
    err = p.stderr.read()
    assert rc == 0, err
    assert "nbd-client" in err and "-blockdev driver=nbd" in err and "--ioengine=nbd" in err
    # nbd-client must be told the block size: its 512 default makes mkfs fail (item 7)
    assert f"nbd-client -unix {tmp_path}/var/nbd.sock /dev/nbd0 -N demo -b 4096" in err
    assert "  demo or namespace0.0: sector, 4096-byte sectors, 510 MiB" in err
    p, uri2 = start_serve(tmp_path)  # the existing region is served again, not recreated
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0 and uri2 == uri


def test_serve_tcp_localhost(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p, uri = start_serve(tmp_path, "--tcp", f"127.0.0.1:{port}", "--durability", "strict")
    try:
        assert uri == f"nbd://127.0.0.1:{port}/demo"
        info = subprocess.run(["nbdinfo", uri], env=ENV, capture_output=True, text=True, check=True)
        assert "export-size" in info.stdout
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0


def test_serve_refuses_a_missing_region(tmp_path):
    p = subprocess.run([*BTTCTL, "serve", "--region", str(tmp_path / "nope.img")], cwd=tmp_path,
                       env=dict(ENV, PYTHONPATH=ROOT), capture_output=True, text=True)
    assert p.returncode == 64 and "no such file" in p.stderr


def test_help_for_every_verb():
    for verb in ("serve", "check-namespace", "read-infoblock"):
        p = subprocess.run([*BTTCTL, verb, "--help"], env=dict(ENV, PYTHONPATH=ROOT),
                           capture_output=True, text=True)
        assert p.returncode == 0 and "usage: bttctl" in p.stdout
    p = subprocess.run([*BTTCTL, "no-such-verb"], env=dict(ENV, PYTHONPATH=ROOT),
                       capture_output=True, text=True)
    assert p.returncode == 64


def test_serve_starts_the_control_socket(tmp_path):
    from control.server import request
    p, uri = start_serve(tmp_path)
    try:
        ctl = tmp_path / "var" / "nbd.ctl"
        for _ in range(100):
            if ctl.exists():
                break
            time.sleep(0.05)
        assert oct(ctl.stat().st_mode & 0o777) == "0o600"
        reply = request(str(ctl), {"op": "list"})
        assert reply["ok"] and reply["result"][0]["dev"] == "namespace0.0"
        assert reply["result"][0]["mode"] == "sector"
        assert request(str(ctl), {"op": "frob"})["errno"] == "EINVAL"
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0


def test_second_serve_leaves_the_running_one_alone(tmp_path):
    """A second `bttctl serve` in the same directory refuses to start and does not unlink
    the first server's socket (which would leave it running but unreachable)."""
    p, uri = start_serve(tmp_path)
    try:
        second = subprocess.run([*BTTCTL, "serve"], cwd=tmp_path, env=dict(ENV, PYTHONPATH=ROOT),
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "already listening" in second.stderr
        second = subprocess.run([*BTTCTL, "serve", "--socket", str(tmp_path / "other.sock")],
                                cwd=tmp_path, env=dict(ENV, PYTHONPATH=ROOT),
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "served by another process" in second.stderr
        info = subprocess.run(["nbdinfo", "--size", uri], env=ENV, capture_output=True,
                              text=True, check=True)
        assert info.stdout.strip() == "535269376"
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0


def _serve_fails(cwd, *args):
    p = subprocess.run([*BTTCTL, "serve", *args], cwd=cwd, env=dict(ENV, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and p.stdout == "", (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "serving" not in p.stderr
    return p.stderr


@pytest.fixture
def region(tmp_path):
    from btt_core import Btt
    path = tmp_path / "r.img"
    Btt.create(str(path), size=64 << 20).close()
    return path


def test_socket_path_over_the_region_is_refused(tmp_path, region):
    """`--socket r.img` must not delete the region to bind a socket there."""
    before = region.read_bytes()
    err = _serve_fails(tmp_path, "--region", str(region), "--socket", str(region))
    assert f"NBD socket path {region} is a regular file; refusing" in err
    assert len(err.strip().splitlines()) == 1 and region.read_bytes() == before


@pytest.mark.parametrize("kind", ["regular file", "symbolic link", "directory"])
def test_control_path_must_be_free_or_a_stale_socket(tmp_path, region, kind):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    path = {"regular file": precious, "symbolic link": tmp_path / "link.ctl",
            "directory": tmp_path / "dir.ctl"}[kind]
    if kind == "symbolic link":
        path.symlink_to(precious)
    elif kind == "directory":
        path.mkdir()
    err = _serve_fails(tmp_path, "--region", str(region), "--control", str(path))
    assert f"control socket path {path} is a {kind}" in err or f"is {kind}" in err
    assert len(err.strip().splitlines()) == 1
    assert os.path.lexists(path) and precious.read_text() == "keep me\n"
    assert not (tmp_path / "r.sock").exists() and not os.path.exists(str(region) + ".journal")


def test_a_stale_socket_is_replaced(tmp_path, region):
    stale = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # left by a killed server: nobody answers
    p, uri = start_serve(tmp_path, "--region", str(region), "--socket", str(stale))
    try:
        assert uri.endswith(f"socket={stale}")
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0


def _bttctl(cwd, *args):
    return subprocess.run([*BTTCTL, *args], cwd=cwd, env=dict(ENV, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=60)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tcp", ["127.0.0.1:99999", "0", "localhost:http", "127.0.0.1:"])
def test_bad_ports_are_usage_errors(tmp_path, region, tcp):
    p = subprocess.run([*BTTCTL, "serve", "--region", str(region), "--tcp", tcp],
                       cwd=tmp_path, env=dict(ENV, PYTHONPATH=ROOT), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 64 and p.stdout == ""
    assert f"--tcp {tcp}: the port must be a number from 1 to 65535" in p.stderr


def test_busy_port_is_a_failed_start(tmp_path, region):
    """Before, the banner was printed although nbdkit had failed: the readiness probe
    connected to whoever held the port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = _serve_fails(tmp_path, "--region", str(region), "--tcp", f"127.0.0.1:{port}")
    assert "nbdkit did not start" in err and "Ctrl-C" not in err
    assert not (tmp_path / f"nbd-{port}.ctl").exists()


def test_a_refusal_of_nbdkit_is_said_in_one_line(tmp_path, region):
    """What nbdkit refuses after bttctl's own checks passed (a damaged BTT here; a region
    another server locked a moment before, in a race) is said in bttctl's one line, not
    as "nbdkit did not start (exit 1)" after nbdkit's own message."""
    from inject import _arena, _write
    base, info = _arena(str(region), 0, None, 0)
    _write(str(region), base + info["logoff"], b"\xff" * 4096)  # an unknown flog scheme
    err = _serve_fails(tmp_path, "--region", str(region))
    assert err.count("\n") == 1, err
    assert err.startswith("bttctl serve: nbdkit did not start: namespace0.0: EUCLEAN: ")
    assert "flog padding scheme" in err and "bttctl check-namespace" in err


def test_two_tcp_servers_in_one_directory(tmp_path):
    """Each gets its own control socket, var/nbd-PORT.ctl; bttctl finds the only one
    without --control, and asks for --control when there are several."""
    from btt_core import Btt
    var = tmp_path / "var"
    var.mkdir()
    for name in ("a.img", "b.img"):
        Btt.create(str(var / name), size=64 << 20).close()
    ports = [_free_port(), _free_port()]
    servers = []
    try:
        for name, port in zip(("a.img", "b.img"), ports, strict=True):
            servers.append(start_serve(tmp_path, "--region", str(var / name), "--tcp",
                                       f"127.0.0.1:{port}")[0])
        for port in ports:
            assert (var / f"nbd-{port}.ctl").is_socket()
        p = _bttctl(tmp_path, "list")
        assert p.returncode == 64 and "several servers' control sockets" in p.stderr
        assert "Traceback" not in p.stderr
        servers[0].send_signal(signal.SIGINT)
        assert servers[0].wait(20) == 0
        assert not (var / f"nbd-{ports[0]}.ctl").exists()
        p = _bttctl(tmp_path, "list")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)[0]["path"] == str(var / "b.img")
    finally:
        for s in servers:
            if s.poll() is None:
                s.send_signal(signal.SIGINT)
                s.wait(20)


def _read_until(stream, text, timeout=15):
    deadline = time.monotonic() + timeout
    seen = ""
    while text not in seen and time.monotonic() < deadline:
        seen += stream.readline()
    return seen


def _wait_until_idle(bttctl_pid, timeout=15):
    """Until every thread of nbdkit (bttctl's child) sleeps. A connection thread that has
    just sent a reply checks nbdkit's quit flag before its next read and then closes the
    connection at that request boundary: under load a stop can land in that window, and the
    wait for a connected client this test is about would not happen."""
    with open(f"/proc/{bttctl_pid}/task/{bttctl_pid}/children") as f:
        nbdkit = f.read().split()[0]
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < 5 and time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{nbdkit}/task"):
            with open(f"/proc/{nbdkit}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        quiet = quiet + 1 if all(s == "S" for s in states) else 0
        time.sleep(0.02)


@pytest.mark.parametrize("sig,again", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_stopping_with_a_client_connected(tmp_path, sig, again):
    """The wait is announced; then (at once after a second Ctrl-C, or after 10 s) nbdkit is
    stopped and neither socket is left behind; bttctl then says no server runs."""
    import nbd
    p, uri = start_serve(tmp_path)
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, 0)  # a client that has sent nothing yet may be dropped by nbdkit at once
    _read_until(p.stderr, "Ctrl-C stops the server.")
    _wait_until_idle(p.pid)
    start = time.monotonic()
    p.send_signal(sig)
    seen = _read_until(p.stderr, "to disconnect")
    assert "waiting up to 10 s for 1 client(s) to disconnect" in seen
    if again:
        p.send_signal(signal.SIGINT)
    assert p.wait(30) == 0
    assert (time.monotonic() - start < 5) if again else (time.monotonic() - start >= 10)
    assert "killing nbdkit" in p.stderr.read()
    del h
    assert not (tmp_path / "var" / "nbd.ctl").exists()
    assert not (tmp_path / "var" / "nbd.sock").exists()
    err = _bttctl(tmp_path, "list").stderr
    assert "no control socket at var/nbd.ctl" in err


def test_a_stale_control_socket_is_explained(tmp_path):
    (tmp_path / "var").mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "var" / "nbd.ctl"))
    s.close()
    p = _bttctl(tmp_path, "list")
    assert p.returncode == 64
    assert "no server is running on var/nbd.ctl (a stale socket" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_locked_region_is_one_line(tmp_path, region):
    p, uri = start_serve(tmp_path, "--region", str(region))
    try:
        err = _serve_fails(tmp_path, "--region", str(region), "--socket",
                           str(tmp_path / "other.sock"))
        assert f"{region} is locked by another server" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0


def test_serve_help_explains_every_option():
    out = subprocess.run([*BTTCTL, "serve", "--help"], env=dict(ENV, PYTHONPATH=ROOT),
                         capture_output=True, text=True).stdout
    out = " ".join(out.split())
    assert "intent journal" in out and "every acknowledged write is durable" in out
    assert "nbdkit thread model" in out and "--max-connections N" in out


def _nbdkit_argv(serve_pid: int) -> list[str]:
    children = subprocess.run(["ps", "--ppid", str(serve_pid), "-o", "pid="],
                              capture_output=True, text=True).stdout.split()
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
        if argv and argv[0].endswith("nbdkit"):
            return argv
    raise AssertionError("no nbdkit child")


def test_connections_are_served_at_once_by_default(tmp_path, region):
    """Issue 13: connections are served at once by default (serialize_requests); under
    --threadmodel parallel, nbdkit gets 4 worker threads per connection or --threads N."""
    for extra, model, threads in (((), "serialize_requests", None),
                                  (("--threadmodel", "parallel"), "parallel", "4"),
                                  (("--threadmodel", "parallel", "--threads", "8"), "parallel",
                                   "8")):
        p, _ = start_serve(tmp_path, "--region", str(region), *extra)
        try:
            argv = _nbdkit_argv(p.pid)
            assert f"threadmodel={model}" in argv
            assert (argv[argv.index("--threads") + 1] if "--threads" in argv else None) == threads
        finally:
            p.send_signal(signal.SIGINT)
            assert p.wait(20) == 0


@pytest.mark.parametrize("threads", ["0", "257"])
def test_threads_out_of_range_is_a_usage_error(tmp_path, region, threads):
    p = subprocess.run([*BTTCTL, "serve", "--region", str(region), "--threads", threads],
                       cwd=tmp_path, env=dict(ENV, PYTHONPATH=ROOT), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 64 and "--threads must be 1..256" in p.stderr


def _banner(p, timeout=20):
    """Everything serve says up to "Ctrl-C stops the server.", then stops it."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        lines.append(line)
        if not line or "Ctrl-C stops" in line:
            break
    p.send_signal(signal.SIGINT)
    assert p.wait(20) == 0
    return "".join(lines)


def _serve(cwd, *args):
    return subprocess.Popen([*BTTCTL, "serve", *args], cwd=cwd, env=dict(ENV, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("readonly", [False, True])
def test_an_empty_region_says_so(tmp_path, readonly):
    """An empty labelled region: the banner used to print namespace0.0's URI and an
    nbd-client command for it, an export that does not exist. Now it says there are no
    namespaces and gives a create-namespace command that works (or says why none can)."""
    region = tmp_path / "empty.img"
    assert _bttctl(tmp_path, "create-region", str(region), "-s", "512M").returncode == 0
    p = _serve(tmp_path, "--region", str(region), *(["--readonly"] if readonly else []))
    err = _banner(p)
    assert p.stdout.read() == ""  # no URI: there is no export to give
    assert "no namespaces yet" in err and "namespace0.0" not in err
    if readonly:
        assert "read-only" in err and "bttctl create-namespace" not in err
        return
    ctl = str(tmp_path / "nbd.ctl")
    cmd = next(line for line in err.splitlines() if "bttctl create-namespace" in line).split()
    assert cmd[:2] == ["bttctl", "create-namespace"] and "--name" in cmd
    p = _serve(tmp_path, "--region", str(region), "--control", ctl)
    try:
        assert "no namespaces yet" in p.stderr.readline() + p.stderr.readline() + \
            p.stderr.readline() + p.stderr.readline() + p.stderr.readline()
        cmd[cmd.index("--control") + 1] = ctl
        r = _bttctl(tmp_path, *cmd[1:])  # the suggested command works
        assert r.returncode == 0, r.stderr
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0


def test_banner_lists_every_export_by_both_names(tmp_path):
    region = tmp_path / "r.img"
    assert _bttctl(tmp_path, "create-region", str(region), "-s", "512M").returncode == 0
    for args in (("--mode", "sector", "--size", "64M", "--name", "db"),
                 ("--mode", "raw", "--size", "64M", "--sector-size", "512"),
                 ("--mode", "sector", "--size", "64M", "--name", "logs")):
        r = _bttctl(tmp_path, "create-namespace", "--region", str(region), *args)
        assert r.returncode == 0, r.stderr
    err = _banner(_serve(tmp_path, "--region", str(region)))
    assert "  db or namespace0.0: sector, 4096-byte sectors" in err
    assert "  namespace0.1: raw, 512-byte sectors, 64 MiB" in err
    assert "  logs or namespace0.2: sector" in err
    assert "-N db -b 4096" in err and "warning" not in err


def test_a_label_less_file_without_a_btt_is_served_with_a_warning(tmp_path):
    """Random bytes given as --region were served read-write as a raw disk, silently."""
    region = tmp_path / "random.img"
    region.write_bytes(os.urandom(8 << 20))
    p = _serve(tmp_path, "--region", str(region))
    err = _banner(p)
    warnings = [line for line in err.splitlines() if "no labels and no BTT" in line]
    assert len(warnings) == 2, err  # nbdkit's log line, and the banner's
    assert str(region) in warnings[0] and "raw" in warnings[0]
    assert "-b 4096" in err
