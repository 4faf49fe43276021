"""docs/serving.md's table of advertised NBD features against what nbdinfo reports: the
Advertised column's first word (yes/no) must match the server, row by row."""
import json
import os
import re
import subprocess

import pytest

from conftest import btt_file
from nbd_helpers import ENV, Server

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## NBD features we advertise, and how each is tested"


def documented() -> dict[str, bool]:
    """{nbdinfo --json field: advertised?} for the yes/no rows of the table."""
    text = open(os.path.join(ROOT, "docs", "serving.md")).read()
    table = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"`[a-z_:A-Z]+`", cells[1]):
            continue
        word = cells[2].split()[0].rstrip(":")
        if word in ("yes", "no"):
            rows[cells[1].strip("`")] = word == "yes"
    return rows


def test_the_table_is_there():
    rows = documented()
    for field in ("structured", "contexts", "TLS", "can_flush", "can_fua", "can_zero",
                  "can_fast_zero", "can_trim", "can_multi_conn", "can_cache"):
        assert field in rows, field


def test_advertised_features_are_the_documented_ones(tmp_path):
    with Server(tmp_path, [btt_file(tmp_path / "r.img")], "durability=group") as s:
        p = subprocess.run(["nbdinfo", "--json", s.uri()], env=ENV, capture_output=True,
                           text=True, timeout=60, check=True)
    info = json.loads(p.stdout)
    export = info["exports"][0]
    seen = {}
    for field in documented():
        if field == "contexts":
            got = "base:allocation" in export["contexts"]
        elif field == "protocol":
            got = info["protocol"] == "newstyle-fixed"
        else:
            got = bool(info[field] if field in info else export[field])
        seen[field] = got
    assert seen == documented()
    assert export["block_size_minimum"] == export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 << 20
