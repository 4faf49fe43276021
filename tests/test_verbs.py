"""The control API (control/verbs.py) without nbdkit: on region files offline, and on an
in-memory region driven at random. What a server adds (exports, clients) is in
test_namespace_e2e.py and test_control_e2e.py."""
import errno
import json
import os
import string
import subprocess
import sys
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from btt_core import Btt, probe
from bttctl.namespace import call_offline, offline
from control.verbs import handle, parse_size
from nvdimm.errors import NdError
from nvdimm.labels import LabelArea
from nvdimm.region import Region
from plugin.exports import Registry

from conftest import MiB
from fakes import MemoryMedia, MemoryStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bttctl(*args):
    return subprocess.run([sys.executable, "-m", "bttctl.main", *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.fixture
def region_file(tmp_path):
    path = str(tmp_path / "region.img")
    LabelArea.create(path, 256 * MiB).close()
    return path


def labels(path):
    area = LabelArea.detect(path)
    try:
        return area.namespaces()
    finally:
        area.close()


def ok(region_path, /, **req):
    reply = call_offline([region_path], req)
    assert reply["ok"], reply
    return reply["result"]


def refused(region_path, err, /, **req):
    reply = call_offline([region_path], req)
    assert not reply["ok"] and reply["errno"] == errno.errorcode[err], reply
    return reply["error"]


def test_create_list_destroy(region_file):
    ns = ok(region_file, op="create-namespace", size="64M", name="db")
    assert ns["dev"] == "namespace0.0" and ns["mode"] == "sector" and ns["name"] == "db"
    assert ns["sector_size"] == 4096 and 60 * MiB < ns["size"] < 64 * MiB
    assert ns["uuid"] != ns["raw_uuid"]  # ndctl: uuid is the BTT's, raw_uuid the namespace's
    found = probe(region_file, offset=0, size=64 * MiB, version="2.0")  # v1.2 labels: BTT 2.0
    assert found["uuid"] == ns["uuid"] and found["parent_uuid"] == ns["raw_uuid"]
    raw = ok(region_file, op="create-namespace", mode="raw", sector_size=512, size=32 * MiB)
    assert raw["dev"] == "namespace0.1" and raw["offset"] == 64 * MiB
    assert raw["size"] == 32 * MiB and raw["sector_size"] == 512 and "holder" not in raw

    listed = ok(region_file, op="list")  # offline: nothing served, so everything listed
    assert [(n["dev"], n["mode"], n["state"]) for n in listed] == [
        ("namespace0.0", "sector", "disabled"), ("namespace0.1", "raw", "disabled")]
    (region,) = ok(region_file, op="list", regions=True)
    assert region["available_size"] == 160 * MiB and region["labels"] == "1.2"

    assert ok(region_file, op="destroy-namespace", namespace="db")["destroyed"]
    # As in Linux, names are given out afresh (in offset order) whenever a region is read:
    # the survivor is namespace0.0 now. alt_name is the stable handle.
    (left,) = ok(region_file, op="list")
    assert (left["dev"], left["offset"], left["raw_uuid"]) == ("namespace0.0", 64 * MiB,
                                                               raw["raw_uuid"])
    assert probe(region_file, offset=0, size=64 * MiB, version="2.0") is None
    assert [label.size for label in labels(region_file)] == [32 * MiB]


def test_destroy_erases_backups_too(region_file):
    """Regression: zeroing only the first 8 KiB left a valid backup info block, which the
    probe reports as a damaged BTT (EUCLEAN), so a new raw namespace there never enabled."""
    ok(region_file, op="create-namespace", size="32M")
    ok(region_file, op="destroy-namespace", namespace="namespace0.0")
    again = ok(region_file, op="create-namespace", mode="raw", size="32M")
    assert again["offset"] == 0
    assert ok(region_file, op="enable-namespace", namespace="namespace0.0")["state"] == "enabled"
    ok(region_file, op="create-namespace", reconfig="namespace0.0", mode="sector")
    ok(region_file, op="create-namespace", reconfig="namespace0.0", mode="raw")
    with offline([region_file]) as registry:
        region = registry.regions[0]
        assert region.media.probe(0, 32 * MiB, "2.0") is None  # no EUCLEAN either


def test_reconfig_keeps_place_and_name(region_file):
    first = ok(region_file, op="create-namespace", size="32M", name="db")
    other = ok(region_file, op="create-namespace", size="32M")
    raw = ok(region_file, op="create-namespace", reconfig="db", mode="raw")
    assert (raw["dev"], raw["offset"], raw["name"], raw["mode"]) == ("namespace0.0", 0, "db",
                                                                     "raw")
    assert raw["raw_uuid"] != first["raw_uuid"]  # a new namespace in the old one's place
    err = refused(region_file, errno.ENOSPC, op="create-namespace", reconfig="db", size="64M")
    assert "in place" in err
    assert ok(region_file, op="get", path="namespace0.0/size") == str(32 * MiB)  # unchanged
    assert ok(region_file, op="get", path="namespace0.1/uuid") == other["raw_uuid"]


def test_refusals_name_the_errno_and_the_valid_values(region_file):
    assert "512, 4096" in refused(region_file, errno.EINVAL, op="create-namespace",
                                  sector_size=520, size="32M")
    assert "sector" in refused(region_file, errno.EINVAL, op="create-namespace", mode="fsdax")
    assert "16 MiB" in refused(region_file, errno.ENXIO, op="create-namespace", size="8M")
    assert "align" in refused(region_file, errno.EINVAL, op="create-namespace", size="20M")
    refused(region_file, errno.ENOSPC, op="create-namespace", size="1G")
    refused(region_file, errno.EINVAL, op="create-namespace", size="lots")
    refused(region_file, errno.EINVAL, op="create-namespace", size="32M", uuid="not-a-uuid")
    refused(region_file, errno.EINVAL, op="frobnicate")
    refused(region_file, errno.EINVAL, op="get", path=7)
    refused(region_file, errno.ENODEV, op="get", path="namespace7.0/size")
    refused(region_file, errno.ENOENT, op="get", path="region0/colour")
    refused(region_file, errno.ENXIO, op="destroy-namespace", namespace="namespace0.0")  # seed
    ns = ok(region_file, op="create-namespace", size="32M")
    refused(region_file, errno.EINVAL, op="create-namespace", size="32M", uuid=ns["raw_uuid"])
    refused(region_file, errno.ENODEV, op="enable-namespace", namespace="nope")
    # Nothing of the refused creates reached the labels.
    assert len(labels(region_file)) == 1


def test_frozen_while_claimed(region_file):
    ok(region_file, op="create-namespace", size="32M", name="db")
    with offline([region_file]) as registry:
        handle(registry, {"op": "enable-namespace", "namespace": "db"})
        with pytest.raises(NdError) as e:
            handle(registry, {"op": "set", "path": "namespace0.0/alt_name", "value": "x"})
        assert e.value.errno == errno.EBUSY
        with pytest.raises(NdError) as e:  # a claimed namespace cannot be exposed raw
            registry.regions[0].bind("namespace0.0")
        assert e.value.errno == errno.ENXIO
        handle(registry, {"op": "disable-namespace", "namespace": "db"})
        assert handle(registry, {"op": "set", "path": "namespace0.0/alt_name",
                                 "value": "x"}) == "x"
        registry.regions[0].check_invariants()


def test_label_less_region(tmp_path):
    path = str(tmp_path / "plain.img")
    Btt.create(path, size=64 * MiB).close()
    (ns,) = ok(path, op="list")
    assert (ns["dev"], ns["mode"], ns["size"] > 60 * MiB) == ("namespace0.0", "sector", True)
    assert "create-namespace -e" in refused(path, errno.ENXIO, op="create-namespace",
                                            region="region0")
    refused(path, errno.ENXIO, op="create-namespace", reconfig="namespace0.0", name="x")
    raw = ok(path, op="create-namespace", reconfig="namespace0.0", mode="raw")
    assert raw["mode"] == "raw" and raw["size"] == 64 * MiB and probe(path) is None
    back = ok(path, op="create-namespace", reconfig="namespace0.0", mode="sector",
              sector_size=512)
    assert back["sector_size"] == 512
    found = probe(path)
    assert found["version"] == "1.1" and found["parent_uuid"] == str(uuid.UUID(int=0))


def test_read_only_region_file(region_file):
    ok(region_file, op="create-namespace", size="32M")
    os.chmod(region_file, 0o444)
    try:
        if not os.access(region_file, os.W_OK):  # root may write it regardless
            refused(region_file, errno.EROFS, op="create-namespace", size="32M")
    finally:
        os.chmod(region_file, 0o644)
    # Root writes anyway; region0/read_only is the switch that holds for everyone.
    with offline([region_file]) as registry:
        handle(registry, {"op": "set", "path": "region0/read_only", "value": "1"})
        with pytest.raises(NdError) as e:
            handle(registry, {"op": "destroy-namespace", "namespace": "namespace0.0"})
        assert e.value.errno == errno.EROFS


def test_offline_cli_and_the_lock(region_file):
    p = bttctl("create-namespace", "--region", region_file, "-s", "32M", "-n", "db")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["name"] == "db"
    p = bttctl("get", "--region", region_file, "namespace0.0/alt_name")
    assert (p.returncode, p.stdout) == (0, "db\n")
    p = bttctl("set", "--region", region_file, "namespace0.0/sector_size", "1000")
    assert p.returncode == 1 and "EINVAL" in p.stderr and "512, 4096" in p.stderr
    p = bttctl("create-namespace", "--region", region_file, "-l", "1000")
    assert p.returncode == 64  # argparse: invalid choice
    p = bttctl("check-namespace", "db", "--region", region_file)
    assert p.returncode == 0, p.stdout + p.stderr
    from nvdimm.regionfile import lock_region
    held = lock_region(region_file)  # as a running server holds it
    try:
        p = bttctl("list", "--region", region_file)
        assert p.returncode != 0 and "EBUSY" in p.stderr and "--control" in p.stderr
        p = bttctl("check-namespace", region_file, "--repair")
        assert p.returncode == 1 and "EBUSY" in p.stderr  # refused, as every EBUSY
    finally:
        held.close()
    p = bttctl("create-region", region_file, "--size", "64M")
    assert p.returncode == 1 and "EEXIST" in p.stderr
    for verb in ("list", "create-namespace", "destroy-namespace", "get", "set", "create-region",
                 "enable-namespace", "disable-namespace"):
        p = bttctl(verb, "--help")
        assert p.returncode == 0 and "usage" in p.stdout


@pytest.mark.parametrize("text,value", [("4096", 4096), ("256M", 256 * MiB), ("1g", 1 << 30),
                                        ("0x1000", 4096), (512, 512)])
def test_parse_size(text, value):
    assert parse_size(text) == value


# ---- random requests against an in-memory region -----------------------------------------------

def memory_registry():
    registry = Registry(serving=False)
    region = Region(MemoryStore(256 * MiB), MemoryMedia(), autobind=False)
    region.path = "memory"
    registry.regions.append(region)
    return registry


NAMES = st.sampled_from(["namespace0.0", "namespace0.1", "namespace0.2", "btt0.0", "btt0.1",
                         "db", "", "region0", "nope"])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 40), NAMES,
                   st.text(string.printable, max_size=12),
                   st.sampled_from(["16M", "32M", "48M", "64M", "raw", "sector", "safe", "4096",
                                    "512", "btt", "1", "0"]))
ATTRS = st.sampled_from(["size", "uuid", "alt_name", "sector_size", "holder_class",
                         "force_raw", "namespace", "read_only", "align", "holder", "mode"])


@st.composite
def requests(draw):
    op = draw(st.sampled_from(["list", "get", "set", "enable-namespace", "disable-namespace",
                               "create-namespace", "destroy-namespace", "bogus"]))
    req = {"op": op}
    for key in draw(st.lists(st.sampled_from(["namespace", "mode", "size", "sector_size", "name",
                                              "uuid", "region", "reconfig", "force", "idle",
                                              "regions", "value"]), max_size=5)):
        req[key] = draw(VALUES)
    if op in ("get", "set"):
        req["path"] = f"{draw(NAMES)}/{draw(ATTRS)}"
    return req


class ControlMachine(RuleBasedStateMachine):
    """Any request gets a result or an NdError (never another exception), a refusal
    changes nothing, and the model's invariants hold after every step."""

    def __init__(self):
        super().__init__()
        self.registry = memory_registry()
        self.region = self.registry.regions[0]

    def snapshot(self):
        return json.dumps(handle(self.registry, {"op": "list", "regions": True}), sort_keys=True)

    @rule(req=requests())
    def anything(self, req):
        before = self.snapshot()
        try:
            handle(self.registry, req)
        except NdError as e:
            assert e.errno and errno.errorcode[e.errno] in str(e)
            if req["op"] not in ("create-namespace",):  # a create may fail after its label
                assert self.snapshot() == before, f"{req} was refused but changed the state"

    @rule(size=st.sampled_from(["16M", "32M", "48M"]), mode=st.sampled_from(["raw", "sector"]))
    def create(self, size, mode):
        try:
            ns = handle(self.registry, {"op": "create-namespace", "size": size, "mode": mode})
        except NdError as e:
            assert e.errno in (errno.ENOSPC, errno.ENXIO), e
            return
        assert ns["mode"] == mode and ns["state"] == "enabled"

    @rule(data=st.data())
    def destroy(self, data):
        names = [n["dev"] for n in handle(self.registry, {"op": "list"})]
        if names:
            name = data.draw(st.sampled_from(names))
            handle(self.registry, {"op": "destroy-namespace", "namespace": name, "force": True})
            assert name not in [n["dev"] for n in handle(self.registry, {"op": "list"})]

    @invariant()
    def consistent(self):
        self.region.check_invariants()
        listed = handle(self.registry, {"op": "list", "idle": True})
        free = self.region.available_size
        assert free + sum(n["raw_size"] for n in listed) == self.region.size
        for n in listed:
            assert n["state"] == ("enabled" if n["mode"] == self.region.namespaces[
                n["dev"]].active_mode else "disabled")


TestControlMachine = ControlMachine.TestCase
TestControlMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


def test_claim_by_hand_like_sysfs(region_file):
    """The kernel's recipe (namespace-model.md §1.4) through get/set: claim a raw namespace
    with the btt seed and enable the btt; the namespace then serves in sector mode."""
    ok(region_file, op="create-namespace", mode="raw", size="32M")
    with offline([region_file]) as registry:
        def do(op, **kw):
            return handle(registry, {"op": op, **kw})

        do("enable-namespace", namespace="namespace0.0")
        seed = do("get", path="region0/btt_seed")
        do("set", path=f"{seed}/uuid", value=str(uuid.uuid4()))
        do("set", path=f"{seed}/sector_size", value="512")
        do("set", path=f"{seed}/namespace", value="namespace0.0")  # raw+claimed
        with pytest.raises(NdError) as e:  # still raw-bound
            do("enable-namespace", namespace=seed)
        assert e.value.errno == errno.EBUSY
        registry.regions[0].unbind("namespace0.0")
        ns = do("enable-namespace", namespace=seed)
        assert (ns["mode"], ns["holder"], ns["sector_size"]) == ("sector", seed, 512)
        assert do("get", path="namespace0.0/mode") == "safe"
        registry.regions[0].check_invariants()
    assert probe(region_file, offset=0, size=32 * MiB, version="1.1")["sector_size"] == 512


# ---- found by review: each of these failed before its fix ----------------------------------

def test_reconfig_refuses_before_it_destroys_anything(region_file):
    db = ok(region_file, op="create-namespace", size="64M", name="db")
    other = ok(region_file, op="create-namespace", size="64M", mode="raw", name="raw1")
    for bad in ({"name": "x" * 64}, {"uuid": other["raw_uuid"]}, {"name": "\ud800"},
                {"force": "false"}):
        reply = call_offline([region_file], {"op": "create-namespace", "reconfig": "db",
                                             "force": True, **bad})
        assert not reply["ok"] and reply["errno"] == "EINVAL", (bad, reply)
        (still,) = [n for n in ok(region_file, op="list") if n.get("name") == "db"]
        assert still["raw_uuid"] == db["raw_uuid"] and still["mode"] == "sector"
        assert probe(region_file, offset=0, size=64 * MiB, version="2.0")["uuid"] == db["uuid"]
    # null means "not given", as for a missing field
    again = ok(region_file, op="create-namespace", reconfig="raw1", name=None, force=True)
    assert again["name"] == "raw1"


def test_create_with_an_unencodable_name_leaves_nothing(region_file):
    refused(region_file, errno.EINVAL, op="create-namespace", size="32M", name="\ud800")
    ns = ok(region_file, op="create-namespace", size="32M", name="ok")
    assert ns["dev"] == "namespace0.0" and len(labels(region_file)) == 1


def test_a_read_only_server_cannot_be_made_writable(region_file):
    ok(region_file, op="create-namespace", size="32M")
    registry = Registry({"readonly": "on"}, serving=False)
    registry.add_region(region_file)
    with pytest.raises(NdError) as e:
        handle(registry, {"op": "set", "path": "region0/read_only", "value": "0"})
    assert e.value.errno == errno.EROFS
    with pytest.raises(NdError) as e:
        handle(registry, {"op": "destroy-namespace", "namespace": "namespace0.0"})
    assert e.value.errno == errno.EROFS


def rename_in_labels(path, names):
    """Writes alt_names straight into the label area, as a Linux guest may (Linux allows
    duplicates and device-like names; our verbs refuse them)."""
    area = LabelArea.detect(path)
    try:
        wanted = area.namespaces()
        for label, name in zip(wanted, names, strict=True):
            label.name = name
        area.update(wanted)
    finally:
        area.close()


def test_aliases_never_take_a_device_name_nor_a_shared_name(region_file):
    for name in ("a", "twin", "b"):
        ok(region_file, op="create-namespace", size="32M", name=name, mode="raw")
    rename_in_labels(region_file, ["namespace0.1", "twin", "twin"])
    with offline([region_file]) as registry:
        def do(op, name):
            return handle(registry, {"op": op, "namespace": name})

        for name in ("namespace0.0", "namespace0.1", "namespace0.2"):
            do("enable-namespace", name)
        assert registry.names["namespace0.1"].name == "namespace0.1"
        # Two namespaces carry "twin": neither gets it, so a client reconnecting by that
        # name, or a control request naming it, can never reach the other disk.
        assert "twin" not in registry.names
        with pytest.raises(NdError) as e:
            do("disable-namespace", "twin")
        assert e.value.errno == errno.EINVAL and "namespace0.1, namespace0.2" in str(e.value)
        handle(registry, {"op": "destroy-namespace", "namespace": "namespace0.2",
                          "force": True})
        assert registry.names["twin"].name == "namespace0.1"  # unique again


def test_reconfigure_shrink_erases_the_old_backup(region_file):
    ok(region_file, op="create-namespace", size="64M", name="db")
    ok(region_file, op="create-namespace", reconfig="db", size="32M", mode="raw")
    with open(region_file, "rb") as f:
        f.seek(64 * MiB - 4096)
        assert f.read(16) != b"BTT_ARENA_INFO\0\0"


def test_reconfigure_may_reuse_the_uuid_its_own_btt_had(region_file):
    db = ok(region_file, op="create-namespace", size="32M", name="db")
    with offline([region_file]) as registry:
        handle(registry, {"op": "enable-namespace", "namespace": "db"})
        again = handle(registry, {"op": "create-namespace", "reconfig": "db", "force": True,
                                  "uuid": db["uuid"]})
        assert again["raw_uuid"] == db["uuid"]


def test_alt_names_starting_with_btt_are_handles_too(region_file):
    ok(region_file, op="create-namespace", size="32M", name="btt-x", mode="raw")
    assert ok(region_file, op="enable-namespace", namespace="btt-x")["dev"] == "namespace0.0"


def test_list_and_enable_agree_on_a_btt_2_0_without_a_claim_class(tmp_path):
    path = str(tmp_path / "plain.img")
    Btt.create(path, size=64 * MiB, version="2.0").close()
    assert ok(path, op="list")[0]["mode"] == "sector"
    assert ok(path, op="enable-namespace", namespace="namespace0.0")["mode"] == "sector"


def test_a_sector_label_without_a_btt_is_refused_not_served_raw(region_file):
    """Issue 16: a v1.2 label with the BTT2 claim class over erased info blocks (a destroy
    or create cut short, in the old orders) came back enabled as a raw export."""
    ok(region_file, op="create-namespace", size="32M", name="db")
    with offline([region_file]) as registry:
        registry.regions[0].media.erase_btt(0, 32 * MiB)
    reply = call_offline([region_file], {"op": "enable-namespace", "namespace": "db"})
    assert not reply["ok"] and reply["errno"] == "ENXIO" and "not served raw" in reply["error"]
    with offline([region_file]) as registry:  # force_raw still reaches the bytes
        handle(registry, {"op": "set", "path": "namespace0.0/force_raw", "value": "1"})
        assert handle(registry, {"op": "enable-namespace", "namespace": "db"})["mode"] == "raw"


# ---- issue 16, item 8: alt_names are unique handles --------------------------------------

def test_a_taken_alt_name_is_refused_with_eexist(region_file):
    """Each of these was accepted before, and the second holder took the export name away."""
    ok(region_file, op="create-namespace", size="32M", name="db")
    ok(region_file, op="create-namespace", size="32M", name="logs", mode="raw")
    err = refused(region_file, errno.EEXIST, op="create-namespace", size="32M", name="db")
    assert "namespace0.0" in err
    assert "namespace0.1" in refused(region_file, errno.EEXIST, op="create-namespace",
                                     size="32M", name="namespace0.1")
    assert "btt" in refused(region_file, errno.EEXIST, op="create-namespace", size="32M",
                            name="btt0.0")
    refused(region_file, errno.EEXIST, op="set", path="namespace0.1/alt_name", value="db")
    refused(region_file, errno.EEXIST, op="set", path="logs/alt_name", value="namespace0.0")
    refused(region_file, errno.EEXIST, op="create-namespace", reconfig="logs", name="db",
            force=True)
    refused(region_file, errno.EINVAL, op="create-namespace", size="32M", name="namespace0.7")
    assert [label.name for label in labels(region_file)] == ["db", "logs"]  # nothing changed
    # Its own name again is no conflict.
    assert ok(region_file, op="set", path="db/alt_name", value="db") == "db"
    assert ok(region_file, op="create-namespace", reconfig="db", mode="raw")["name"] == "db"


def test_get_and_set_by_alt_name(region_file):
    """README: alt_names name namespaces. `get db/size` said ENODEV before."""
    ok(region_file, op="create-namespace", size="32M", name="db")
    assert ok(region_file, op="get", path="db/size") == str(32 * MiB)
    assert ok(region_file, op="set", path="db/alt_name", value="db2") == "db2"
    assert ok(region_file, op="get", path="db2/uuid") == ok(region_file, op="get",
                                                           path="namespace0.0/uuid")
    refused(region_file, errno.ENODEV, op="get", path="nope/size")
