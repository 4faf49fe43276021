"""The first hour of a new user: README.md's "A short session", run as written.

The commands come from README.md itself, so the README cannot drift from what the commands
do. `make serve` is run as the Makefile runs it (`.venv/bin/bttctl serve`), in a temporary
directory that has the project's .venv, so var/ is the test's own. The attach step uses
nbd-client where the kernel's nbd module is available, else the README's nbdfuse + loop
device lines; without either it is left out, and the test says so.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess

import pytest

from nbd_helpers import ENV, ROOT

pytestmark = pytest.mark.e2e
VENV = os.path.join(ROOT, ".venv")


def readme_blocks():
    """(the session's lines, the nbdfuse lines that replace its nbd-client lines)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## A short session", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the session and its nbdfuse alternative"
    return [b.strip().splitlines() for b in blocks]


def kernel_nbd() -> str | None:
    """Why nbd-client cannot attach here, or None if it can."""
    if not shutil.which("nbd-client", path=ENV["PATH"]):
        return "nbd-client is not installed"
    if not os.path.exists("/dev/nbd0"):
        modprobe = shutil.which("modprobe", path=ENV["PATH"])
        if not modprobe or subprocess.run([modprobe, "nbd"], capture_output=True).returncode:
            return "the nbd kernel module cannot be loaded"
    return None


def fuse_loop() -> str | None:
    """Why the nbdfuse + loop device recipe cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "losetup and umount need root"
    for tool in ("nbdfuse", "losetup", "mkfs.ext4"):
        if not shutil.which(tool, path=ENV["PATH"]):
            return f"{tool} is not installed"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"no {dev}"
    return None


def script(lines) -> str:
    """The lines as one bash script (background jobs and `wait` need one shell) that stops
    at the first command that fails, naming it. `set -e` would not: it ignores a failure
    inside an `a && b && c` list."""
    out = ["shopt -s expand_aliases"]
    for line in lines:
        out += [line, f"rc=$?; if [ $rc != 0 ]; then echo \"README command failed (exit $rc): "
                      f"\"{shlex.quote(line)} >&2; exit 1; fi"]
    return "\n".join(out) + "\n"


def cleanup(cwd):
    """After a failure half-way: the loop device and the FUSE mount the session made."""
    mnt = os.path.join(cwd, "mnt")
    if os.path.isdir(mnt):
        found = subprocess.run(["losetup", "-j", os.path.join(mnt, "db")], env=ENV,
                               capture_output=True, text=True).stdout
        for dev in re.findall(r"^(/dev/loop\d+):", found, re.M):
            subprocess.run(["losetup", "-d", dev], env=ENV, capture_output=True)
        subprocess.run(["umount", "-l", mnt], env=ENV, capture_output=True)


def test_readme_short_session(tmp_path):
    session, fuse_lines = readme_blocks()
    assert session[0].split("#")[0].strip() == "make serve"
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert "$(VENV)/bin/bttctl serve $(ARGS)" in f.read()  # what make serve runs
    assert session[1].startswith("alias bttctl=$PWD/.venv/bin/bttctl")
    if not os.path.exists(os.path.join(VENV, "bin", "bttctl")):
        pytest.skip("needs `make venv` (the README's bttctl is .venv/bin/bttctl)")
    attach = [i for i, line in enumerate(session) if "/dev/nbd0" in line]
    assert attach and "-b 4096" in session[attach[0]], "nbd-client must say -b SECTOR_SIZE"
    skipped = None
    if kernel_nbd() is None:
        steps = session[2:]
    else:
        skipped = fuse_loop()
        replaced = fuse_lines if skipped is None else []
        steps = session[2:attach[0]] + replaced + session[attach[-1] + 1:]
        if skipped:
            skipped = f"{kernel_nbd()}, and nbdfuse cannot stand in: {skipped}"

    cwd = str(tmp_path)
    os.symlink(VENV, os.path.join(cwd, ".venv"))  # the README runs in the project directory
    server = subprocess.Popen([os.path.join(cwd, ".venv", "bin", "bttctl"), "serve"], cwd=cwd,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        uri = server.stdout.readline().strip()
        assert uri.startswith("nbd+unix:///demo?socket="), server.stderr.read()
        run = subprocess.run(["bash", "-c", script(session[1:2] + steps)], cwd=cwd, env=ENV,
                             capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Traceback" not in run.stderr
    finally:
        cleanup(cwd)
        server.send_signal(signal.SIGINT)
        rc = server.wait(30)
    log = server.stderr.read()
    assert rc == 0 and "Traceback" not in log, log[-3000:]
    # The session ends with db served again, in sector mode.
    listed = subprocess.run([os.path.join(VENV, "bin", "bttctl"), "list", "--region",
                             os.path.join(cwd, "var", "region0.img")], env=ENV,
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert '"name": "db"' in listed.stdout and '"mode": "sector"' in listed.stdout
    if skipped:
        pytest.skip(f"ran the session without its attach and mkfs step: {skipped}")
