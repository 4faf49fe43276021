"""Running as a service: socket activation through systemd-socket-activate (LISTEN_FDS
reaching nbdkit with LISTEN_PID equal to nbdkit's own pid), --pid-file, SIGTERM stopping
the server exactly as Ctrl-C does, and the unit files in contrib/systemd."""
import os
import shutil
import signal
import subprocess
import sys
import time

import nbd
import pytest

from bttctl import activation

from conftest import btt_file
from nbd_helpers import ENV

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BTTCTL = [sys.executable, "-m", "bttctl.main"]
CLI_ENV = dict(ENV, PYTHONPATH=ROOT)
UNITS = os.path.join(ROOT, "contrib", "systemd")


def _wait_for(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _proc(pid, what):
    with open(f"/proc/{pid}/{what}", "rb") as f:
        return f.read().split(b"\0")


def test_socket_activation_hands_the_socket_to_nbdkit(tmp_path):
    region = btt_file(tmp_path / "r.img")
    sock, pid_file = tmp_path / "svc.sock", tmp_path / "svc.pid"
    p = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), "--", *BTTCTL, "serve",
                          "--region", region, "--pid-file", str(pid_file)],
                         env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock.exists, "systemd-socket-activate did not listen")
        # The first connection starts the service; it waits in the backlog meanwhile.
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///namespace0.0?socket={sock}")
        h.pwrite(b"\x5a" * 4096, 0)
        h.flush()
        assert h.pread(4096, 0) == b"\x5a" * 4096
        uri = p.stdout.readline().strip()
        assert uri == f"nbd+unix:///namespace0.0?socket={sock}"
        # systemd-socket-activate execs the service: bttctl's pid is p.pid, in the pid file
        _wait_for(pid_file.exists, "no pid file")
        assert pid_file.read_text() == f"{p.pid}\n"
        (nbdkit,) = _children(p.pid)
        argv = _proc(nbdkit, "cmdline")
        assert argv[0] == b"nbdkit" and b"--unix" not in argv and b"--port" not in argv
        env = dict(v.split(b"=", 1) for v in _proc(nbdkit, "environ") if b"=" in v)
        assert env[b"LISTEN_PID"] == str(nbdkit).encode() and env[b"LISTEN_FDS"] == b"1"
        # The control socket went beside the activated one
        ctl = tmp_path / "svc.ctl"
        assert ctl.exists()
        h.shutdown()
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert "bttctl serve: stopped" in err and "Traceback" not in err
    assert not pid_file.exists() and not ctl.exists()
    assert sock.exists()  # systemd's socket: not ours to remove


def test_socket_activation_with_an_address_option_is_refused(tmp_path):
    region = btt_file(tmp_path / "r.img")
    sock = tmp_path / "svc.sock"
    p = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), "--", *BTTCTL, "serve",
                          "--region", region, "--socket", str(tmp_path / "other.sock")],
                         env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock.exists, "systemd-socket-activate did not listen")
        with pytest.raises(nbd.Error):
            nbd.NBD().connect_unix(str(sock))
        assert p.wait(30) == 64
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "the socket comes from systemd (LISTEN_FDS)" in p.stderr.read()


def test_listen_fds_meant_for_another_process_are_ignored():
    me = str(os.getpid())
    assert activation.listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getppid())}) == []
    assert activation.listen_fds({"LISTEN_FDS": "1"}) == []
    with pytest.raises(activation.ActivationError, match="expected 1 to 16"):
        activation.listen_fds({"LISTEN_FDS": "0", "LISTEN_PID": me})
    r, w = os.pipe()  # a pipe at fd 3 is not a socket
    try:
        if r == 3:
            with pytest.raises(activation.ActivationError, match="fd 3 is not a socket"):
                activation.listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": me})
    finally:
        os.close(r)
        os.close(w)
    env = activation.child_env({"LISTEN_PID": me, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x",
                                "HOME": "/"}, [])
    assert env == {"HOME": "/"}


def _serve(tmp_path, *args):
    region = tmp_path / "r.img"
    region = str(region) if region.exists() else btt_file(region)
    p = subprocess.Popen([*BTTCTL, "serve", "--region", region, *args], cwd=tmp_path,
                         env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uri = p.stdout.readline().strip()
    assert uri, p.stderr.read()
    return p, uri


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigterm_stops_like_ctrl_c(tmp_path, sig):
    """With a client connected: the same clean exit, the same clean-up, whichever signal
    (Python's default SIGTERM would end bttctl at once, leaving the pid file and sockets)."""
    pid_file = tmp_path / "serve.pid"
    p, uri = _serve(tmp_path, "--pid-file", str(pid_file))
    sock = tmp_path / "r.sock"
    try:
        assert pid_file.read_text() == f"{p.pid}\n"
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"\x33" * 4096, 4096)
        h.flush()
        p.send_signal(sig)
        time.sleep(0.5)
        # nbdkit is on its way out: it takes no new request, and waits for the client to go
        refused = False
        try:
            h.pwrite(b"\x44" * 4096, 8192)
        except nbd.Error:
            refused = True
        assert refused
        del h  # closes the connection (no traceback keeps the handle alive)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read().split("Ctrl-C stops the server.\n", 1)[1]
    assert err.endswith("bttctl serve: stopped\n") and "Traceback" not in err, err
    assert not pid_file.exists() and not sock.exists() and not (tmp_path / "r.ctl").exists()
    # nothing acknowledged was lost on the way out
    p, uri = _serve(tmp_path)
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(8192, 4096) == b"\x33" * 4096 + bytes(4096)
        h.shutdown()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0


def test_pid_file_is_not_followed_and_not_shared(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("keep\n")
    link = tmp_path / "link.pid"
    link.symlink_to(precious)
    region = btt_file(tmp_path / "r.img")
    refused = subprocess.run([*BTTCTL, "serve", "--region", region, "--pid-file", str(link)],
                             cwd=tmp_path, env=CLI_ENV, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (f"bttctl serve: --pid-file {link}: too many levels of "
                                      "symbolic links")
    assert precious.read_text() == "keep\n" and link.is_symlink()
    assert not (tmp_path / "r.sock").exists()  # refused before nbdkit started
    # A file that is not a pid file is somebody's data: neither rewritten nor removed
    refused = subprocess.run([*BTTCTL, "serve", "--region", region, "--pid-file",
                              str(precious)], cwd=tmp_path, env=CLI_ENV, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"bttctl serve: --pid-file {precious}: exists and is not a pid file (5 bytes); "
        "refusing to overwrite it")
    assert precious.read_text() == "keep\n"
    # A stale pid file (its process is gone) is taken over, and removed at exit
    pid_file = tmp_path / "serve.pid"
    pid_file.write_text("999999999\n")
    p, uri = _serve(tmp_path, "--pid-file", str(pid_file))
    try:
        assert pid_file.read_text() == f"{p.pid}\n"
        other = tmp_path / "other"
        other.mkdir()
        second = subprocess.run([*BTTCTL, "serve", "--region", btt_file(other / "o.img"),
                                 "--pid-file", str(pid_file)], cwd=other, env=CLI_ENV,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"in use by the running server pid {p.pid}" in second.stderr
        assert pid_file.read_text() == f"{p.pid}\n"
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    assert not pid_file.exists()


def test_nbdkit_does_not_outlive_a_killed_bttctl(tmp_path):
    """--exit-with-parent: a kill -9 of bttctl stops nbdkit too, releasing the region."""
    p, uri = _serve(tmp_path)
    (nbdkit,) = _children(p.pid)
    p.kill()
    p.wait()
    _wait_for(lambda: not os.path.exists(f"/proc/{nbdkit}") or
              _proc(nbdkit, "stat")[0].split()[2] == b"Z", "nbdkit outlived bttctl")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_units_verify(tmp_path):
    """systemd-analyze verify on instances of the templates, with ExecStart pointed at a
    bttctl that exists here (verify checks that the command is executable)."""
    bttctl = shutil.which("bttctl", path=os.path.dirname(sys.executable)) or "/bin/true"
    conf = tmp_path / "demo.conf"
    shutil.copy(os.path.join(UNITS, "bttctl.conf.example"), conf)
    for kind in ("socket", "service"):
        text = open(os.path.join(UNITS, f"bttctl@.{kind}")).read()
        text = text.replace("/usr/local/bin/bttctl", bttctl).replace(
            "/etc/bttctl/%i.conf", str(conf))
        (tmp_path / f"bttctl@demo.{kind}").write_text(text)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        str(tmp_path / "bttctl@demo.socket"),
                        str(tmp_path / "bttctl@demo.service")],
                       capture_output=True, text=True, timeout=120)
    if p.returncode and "Failed to" in p.stderr and "bus" in p.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {p.stderr.strip()}")
    assert p.returncode == 0, p.stderr
    assert "bttctl@" not in p.stderr, p.stderr  # no warnings about our units
