"""bttctl/cluster.py: one control view over several servers (`--control A --control B`),
each server a real nbdkit with its own control socket, as two hosts would run them."""
import json
import os
import socket
import subprocess
import sys

import pytest

from nbd_helpers import ENV, Server

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bttctl(*args):
    return subprocess.run([sys.executable, "-m", "bttctl.main", *args], capture_output=True,
                          text=True, env=dict(ENV, PYTHONPATH=ROOT), timeout=60)


def _region(path, name):
    assert bttctl("create-region", str(path), "-s", "128M").returncode == 0
    p = bttctl("create-namespace", "--region", str(path), "-s", "32M", "-n", name)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture
def two_servers(tmp_path):
    """Server A serves alt_name "alpha", server B "beta"; both call it namespace0.0."""
    out = []
    for host, name in (("a", "alpha"), ("b", "beta")):
        d = tmp_path / host
        d.mkdir()
        ns = _region(d / "r.img", name)
        ctl = str(d / "nbd.ctl")
        out.append((Server(d, [str(d / "r.img")], f"control={ctl}").start(), ctl, ns))
    yield out
    for s, _, _ in out:
        s.stop()


def test_list_shows_every_server_with_its_host(two_servers):
    (_, ctl_a, ns_a), (_, ctl_b, ns_b) = two_servers
    p = bttctl("list", "--control", ctl_a, "--control", ctl_b)
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    assert [(n["name"], n["control"]) for n in listed] == [("alpha", ctl_a), ("beta", ctl_b)]
    assert all(n["host"] == socket.gethostname() and n["pid"] for n in listed)
    assert listed[0]["pid"] != listed[1]["pid"]
    regions = json.loads(bttctl("list", "-R", "--control", ctl_a, "--control", ctl_b).stdout)
    assert [r["namespaces"][0]["name"] for r in regions] == ["alpha", "beta"]
    assert all(r["host"] == socket.gethostname() for r in regions)


def test_a_namespace_is_found_by_uuid_or_alt_name_wherever_it_runs(two_servers):
    (_, ctl_a, _), (_, ctl_b, ns_b) = two_servers
    both = ("--control", ctl_a, "--control", ctl_b)
    p = bttctl("get", f"{ns_b['uuid']}/alt_name", *both)
    assert (p.returncode, p.stdout) == (0, "beta\n"), p.stderr
    p = bttctl("get", "beta/size", *both)
    assert p.returncode == 0 and int(p.stdout) == ns_b["raw_size"]  # the namespace's size
    p = bttctl("disable-namespace", ns_b["raw_uuid"], *both)  # the namespace's own uuid too
    assert p.returncode == 0, p.stderr
    listed = json.loads(bttctl("list", "-i", *both).stdout)
    assert {n["name"]: n["state"] for n in listed} == {"alpha": "enabled", "beta": "disabled"}
    assert bttctl("enable-namespace", "beta", *both).returncode == 0
    p = bttctl("get", f"{ns_b['uuid']}/alt_name", "--control", ctl_b)  # one server: also
    assert p.stdout == "beta\n"


def test_ambiguous_unknown_and_unplaced_are_refused(two_servers):
    (_, ctl_a, _), (_, ctl_b, _) = two_servers
    both = ("--control", ctl_a, "--control", ctl_b)
    p = bttctl("get", "namespace0.0/size", *both)  # both servers have one
    assert p.returncode == 64 and "EINVAL" in p.stderr and "several namespaces" in p.stderr
    p = bttctl("disable-namespace", "gamma", *both)
    assert p.returncode == 64 and "ENODEV: no namespace 'gamma'" in p.stderr
    p = bttctl("create-namespace", "-s", "16M", *both)
    assert p.returncode == 64 and "one --control" in p.stderr
    p = bttctl("check-namespace", "alpha", *both)
    assert p.returncode == 64 and "give one --control" in p.stderr


def test_an_unreachable_server_is_named_and_the_others_still_listed(two_servers, tmp_path):
    (_, ctl_a, _), _ = two_servers
    gone = str(tmp_path / "gone.ctl")
    p = bttctl("list", "--control", gone, "--control", ctl_a)
    assert p.returncode == 1
    assert [n["name"] for n in json.loads(p.stdout)] == ["alpha"]
    assert p.stderr.count("\n") == 1 and gone in p.stderr and "ENOENT" in p.stderr
    # A device name found on the one server that answered may be on the silent one too:
    # refused; its uuid is the same everywhere, so that still reaches it.
    p = bttctl("disable-namespace", "namespace0.0", "--control", gone, "--control", ctl_a)
    assert p.returncode == 64 and "EHOSTUNREACH" in p.stderr and "by uuid" in p.stderr
    uuid = json.loads(bttctl("list", "--control", ctl_a).stdout)[0]["uuid"]
    p = bttctl("get", f"{uuid}/alt_name", "--control", gone, "--control", ctl_a)
    assert (p.returncode, p.stdout) == (0, "alpha\n"), p.stderr
