"""bttctl check-namespace / read-infoblock: exit codes, JSON, human output, usage errors."""
import json
import subprocess
import sys

import pytest

from btt_core import Btt
from bttctl import check as cli_check

from conftest import MiB, pattern


def bttctl(*args):
    return subprocess.run([sys.executable, "-m", "bttctl.check", *args], capture_output=True,
                          text=True)


@pytest.fixture
def region(tmpfile):
    with Btt.create(tmpfile, size=40 * MiB, durability="strict") as b:
        b.write(3, pattern(1, 3, 4096))
    return tmpfile


def test_clean_exit_0_with_json(region):
    p = bttctl("check-namespace", "--json", region)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["status"] == 0 and r["version"] == "1.1" and r["findings"] == []


def test_damage_exit_1_then_repair_exit_2_then_clean(region):
    with open(region, "r+b") as f:
        f.seek(4096)
        f.write(bytes(4096))
    p = bttctl("check-namespace", region)
    assert p.returncode == 1 and "info-primary" in p.stdout and "problem(s) left" in p.stdout
    p = bttctl("check-namespace", "--repair", region)
    assert p.returncode == 2 and "[repaired]" in p.stdout
    assert bttctl("check-namespace", region).returncode == 0


def test_no_btt_exit_3(tmpfile):
    with open(tmpfile, "wb") as f:
        f.truncate(40 * MiB)
    p = bttctl("check-namespace", tmpfile)
    assert p.returncode == 3 and "no BTT found" in p.stderr and "ENODEV" in p.stderr


@pytest.mark.parametrize("argv", [["check-namespace"], ["check-namespace", "--bogus", "x"],
                                  ["check-namespace", "--rewrite-log", "x"],
                                  ["check-namespace", "/nonexistent/file"], ["frobnicate"]])
def test_usage_errors_exit_64(argv):
    p = bttctl(*argv)
    assert p.returncode == 64, (p.returncode, p.stderr)
    assert p.stderr.strip()


def test_help_for_each_verb():
    for verb in ("check-namespace", "read-infoblock"):
        p = bttctl(verb, "--help")
        assert p.returncode == 0 and "usage:" in p.stdout


def test_read_infoblock_json_and_summary(region):
    p = bttctl("read-infoblock", "--json", region)
    assert p.returncode == 0
    (found,) = json.loads(p.stdout)
    assert found["version"] == "1.1" and found["arenas"][0]["primary"]["checksum_ok"]
    p = bttctl("read-infoblock", region)
    assert "primary valid" in p.stdout and "backup matches" in p.stdout


def test_in_process_main(region, capsys):
    assert cli_check.main(["check-namespace", "--json", region]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == 0
