"""The namespace/claim model: every §3.2 transition and refusal, attribute formats, label
write-through, and a stateful test against a small reference model."""
import errno
import uuid

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nvdimm.attrs import parse_bool, parse_u64, parse_uuid
from nvdimm.errors import NdError
from nvdimm.labels import LabelArea, LabelError
from nvdimm.media import FileMedia
from nvdimm.region import Region
from nvdimm.stores import AreaStore, NoLabels

from fakes import MemoryMedia, MemoryStore

MiB = 1 << 20
U = [str(uuid.UUID(int=0xA0 + i)) for i in range(8)]  # namespace uuids
B = [str(uuid.UUID(int=0xB0 + i)) for i in range(8)]  # btt uuids
SIZE = 256 * MiB


def make_region(labelled=True, version="1.2", read_only=False, size=SIZE):
    store = MemoryStore(size, version) if labelled else NoLabels(size)
    return Region(store, MemoryMedia(), read_only=read_only, autobind=False)


def run(region, step: str):
    """One step of the table's little language:
    set PATH VALUE | bind NAME | unbind NAME | region-disable | region-enable |
    btt-on-media NS VERSION UUID SECTOR | damage NS VERSION | read-only"""
    verb, *args = step.split()
    if verb == "set":
        region.set(args[0], " ".join(args[1:]))
    elif verb == "bind":
        region.bind(args[0])
    elif verb == "unbind":
        region.unbind(args[0])
    elif verb == "region-disable":
        region.disable()
    elif verb == "region-enable":
        region.enable(autobind=False)
    elif verb == "btt-on-media":
        ns = region.namespaces[args[0]]
        region.media.btts[(ns.offset, args[1])] = {
            "version": args[1], "uuid": uuid.UUID(args[2]),
            "parent_uuid": ns.uuid or uuid.UUID(int=0), "sector_size": int(args[3]),
            "size": ns.size // 2}
    elif verb == "damage":
        region.media.damaged.add((region.namespaces[args[0]].offset, args[1]))
    elif verb == "read-only":
        region.read_only = True
    else:
        raise ValueError(step)
    region.check_invariants()


# Setups: sequences of steps that reach a §3.1 state.
N1 = [f"set namespace0.0/uuid {U[0]}", f"set namespace0.0/size {64 * MiB}"]  # idle (seed)
N2 = N1 + ["bind namespace0.0"]                                             # raw
B1 = [f"set btt0.0/uuid {B[0]}", "set btt0.0/sector_size 4096"]             # btt configured
N3 = N1 + B1 + ["set btt0.0/namespace namespace0.0"]                       # claimed
N2c = N2 + B1 + ["set btt0.0/namespace namespace0.0"]                      # raw+claimed
N4 = N3 + ["bind btt0.0"]                                                   # btt-active
# namespace0.1: idle, neither the seed nor id 0
NONSEED = N2 + ["unbind namespace0.0", f"set namespace0.1/uuid {U[1]}",
                f"set namespace0.1/size {32 * MiB}", "bind namespace0.1", "unbind namespace0.1"]

ROWS = [
    # row, setup, action, expected errno (None = success), {attribute: value} afterwards
    (1, [], f"set namespace0.0/uuid {U[0]}", None, {"namespace0.0/uuid": U[0]}),
    (1, N1, f"set namespace0.0/uuid {U[1]}", None, {"namespace0.0/uuid": U[1]}),
    (1, N1, "set namespace0.0/uuid 0123456789abcdef0123456789abcdef", None,
     {"namespace0.0/uuid": "01234567-89ab-cdef-0123-456789abcdef"}),
    (1, N2, f"set namespace0.0/uuid {U[1]}", errno.EBUSY, {"namespace0.0/uuid": U[0]}),
    (1, N3, f"set namespace0.0/uuid {U[1]}", errno.EBUSY, {}),
    (1, [], "set namespace0.0/uuid not-a-uuid", errno.EINVAL, {"namespace0.0/uuid": ""}),
    (1, NONSEED, f"set namespace0.2/uuid {U[0]}", errno.EINVAL, {}),        # another ns's
    (1, B1, f"set namespace0.0/uuid {B[0]}", errno.EINVAL, {}),             # a btt's
    (2, N1, "", None, {"namespace0.0/size": str(64 * MiB), "region0/available_size":
                       str(SIZE - 64 * MiB), "namespace0.0/resource": "0x0"}),
    (2, [], f"set namespace0.0/size {64 * MiB}", errno.ENXIO, {"namespace0.0/size": "0"}),
    (2, [f"set namespace0.0/uuid {U[0]}"], f"set namespace0.0/size {MiB}", errno.EINVAL, {}),
    (2, [f"set namespace0.0/uuid {U[0]}"], f"set namespace0.0/size {2 * SIZE}", errno.ENOSPC,
     {}),
    (2, [f"set namespace0.0/uuid {U[0]}"], "set namespace0.0/size 0x4000000", None,
     {"namespace0.0/size": str(64 * MiB)}),
    (2, [f"set namespace0.0/uuid {U[0]}"], "set namespace0.0/size lots", errno.EINVAL, {}),
    (2, N2, f"set namespace0.0/size {32 * MiB}", errno.EBUSY, {}),
    (3, NONSEED, "set namespace0.1/size 0", None, {"region0/namespace_seed": "namespace0.2"}),
    (3, N1, "set namespace0.0/size 0", None,                                 # the seed stays
     {"namespace0.0/size": "0", "namespace0.0/uuid": "", "region0/namespace_seed":
      "namespace0.0"}),
    (3, NONSEED, "set namespace0.0/size 0", None, {"namespace0.0/size": "0"}),  # id 0 stays
    (3, N3, "set namespace0.0/size 0", errno.EBUSY, {}),
    (4, N1, "set namespace0.0/alt_name  db ", None, {"namespace0.0/alt_name": "db"}),
    (4, N1, "set namespace0.0/alt_name " + "x" * 64, errno.EINVAL, {}),
    (4, N2, "set namespace0.0/alt_name db", errno.EBUSY, {}),
    (4, N1, "set namespace0.0/sector_size 4096", None,
     {"namespace0.0/sector_size": "512 [4096]"}),
    (4, N1, "set namespace0.0/sector_size 520", errno.EINVAL, {}),
    (4, N1, "set namespace0.0/holder_class btt", None, {"namespace0.0/holder_class": "btt"}),
    (4, N1, "set namespace0.0/holder_class dax", None, {"namespace0.0/holder_class": "dax"}),
    (4, N1, "set namespace0.0/holder_class blk", errno.EINVAL, {}),
    (4, N3, "set namespace0.0/holder_class ", errno.EBUSY, {}),
    (5, N1 + [f"btt-on-media namespace0.0 1.1 {B[3]} 512"], "bind namespace0.0", None,
     {"namespace0.0/holder": "btt0.1", "namespace0.0/mode": "safe", "btt0.1/uuid": B[3],
      "btt0.1/sector_size": "[512] 520 528 4096 4104 4160 4224", "btt0.1/size":
      str(32 * MiB), "region0/btt_seed": "btt0.0", "region0/namespace_seed": "namespace0.1"}),
    (5, N1 + ["set namespace0.0/holder_class btt", f"btt-on-media namespace0.0 2.0 {B[3]} 512"],
     "bind namespace0.0", None, {"namespace0.0/holder": "btt0.1"}),
    (5, N1 + ["damage namespace0.0 1.1"], "bind namespace0.0", errno.EUCLEAN,
     {"namespace0.0/holder": ""}),
    (5, [f"set namespace0.0/uuid {U[0]}"], "bind namespace0.0", errno.ENODEV, {}),
    (6, N1, "bind namespace0.0", None,
     {"namespace0.0/mode": "raw", "namespace0.0/holder": "", "region0/namespace_seed":
      "namespace0.1"}),
    (6, N1 + [f"btt-on-media namespace0.0 1.1 {B[3]} 512", "set namespace0.0/force_raw 1"],
     "bind namespace0.0", None, {"namespace0.0/mode": "raw", "namespace0.0/force_raw": "1"}),
    (6, N1 + [f"btt-on-media namespace0.0 1.1 {B[3]} 512", "set namespace0.0/holder_class dax"],
     "bind namespace0.0", None, {"namespace0.0/mode": "raw"}),             # no autodetect
    (6, [], "bind namespace0.0", errno.ENODEV, {}),
    (7, N2, "unbind namespace0.0", None, {"namespace0.0/mode": "raw"}),
    (7, N1, "unbind namespace0.0", errno.ENODEV, {}),
    (8, N1 + B1, "set btt0.0/namespace namespace0.0", None,
     {"namespace0.0/holder": "btt0.0", "namespace0.0/mode": "safe", "btt0.0/namespace":
      "namespace0.0"}),
    (8, N1 + B1, "set btt0.0/namespace pmem0", errno.EINVAL, {}),
    (8, N1 + B1, "set btt0.0/namespace namespace0.9", errno.ENODEV, {}),
    (8, [f"set namespace0.0/uuid {U[0]}", f"set namespace0.0/size {16 * MiB}"] + B1,
     "set btt0.0/namespace namespace0.0", None, {}),                       # 16 MiB is enough
    (8, NONSEED + ["set namespace0.0/size 0"], "set btt0.0/namespace namespace0.0",
     errno.ENXIO, {}),                                                      # 0 bytes is not
    (8, N1 + ["set namespace0.0/holder_class pfn"], "set btt0.0/namespace namespace0.0",
     errno.EBUSY, {"namespace0.0/holder": ""}),
    (8, N3, "set btt0.0/namespace namespace0.1", errno.EBUSY, {}),         # btt has a ns
    (8, N3, "set btt0.0/namespace namespace0.0", None, {}),                # same: no-op
    (8, N3 + ["set btt0.1/namespace namespace0.0"][:0], "set btt0.1/namespace namespace0.0",
     errno.ENODEV, {}),                                                     # no btt0.1 yet
    (8, N4, "set btt0.1/namespace namespace0.0", errno.EBUSY, {}),         # ns claimed
    (9, N2 + B1, "set btt0.0/namespace namespace0.0", None,
     {"namespace0.0/holder": "btt0.0", "namespace0.0/mode": "safe"}),
    (10, N2c, "unbind namespace0.0", None, {"namespace0.0/holder": "btt0.0"}),
    (11, N3, "bind btt0.0", None,
     {"btt0.0/size": str((64 * MiB - MiB - 4096 - 8192) // 4096 * 4096),
      "region0/btt_seed": "btt0.1", "region0/namespace_seed": "namespace0.1"}),
    (11, N2c, "bind btt0.0", errno.EBUSY, {}),
    (11, N1 + ["set btt0.0/namespace namespace0.0"], "bind btt0.0", errno.ENODEV, {}),
    (11, N1 + [f"set btt0.0/uuid {B[0]}", "set btt0.0/namespace namespace0.0"], "bind btt0.0",
     errno.ENODEV, {}),
    (11, B1, "bind btt0.0", errno.ENODEV, {}),
    (11, [f"set namespace0.0/uuid {U[0]}", f"set namespace0.0/size {16 * MiB}"] + B1 +
     ["set btt0.0/namespace namespace0.0"], "bind btt0.0", errno.ENXIO, {}),  # 1.1 needs +4K
    (11, [f"set namespace0.0/uuid {U[0]}", f"set namespace0.0/size {16 * MiB}",
          "set namespace0.0/holder_class btt"] + B1 + ["set btt0.0/namespace namespace0.0"],
     "bind btt0.0", None, {}),                                               # 2.0 fits
    (11, N3 + ["read-only"], "bind btt0.0", errno.ENOMEM, {}),
    (11, N3 + [f"btt-on-media namespace0.0 1.1 {B[0]} 4096", "read-only"], "bind btt0.0", None,
     {}),                                                                   # reuse is fine
    (11, N3 + [f"btt-on-media namespace0.0 1.1 {B[5]} 4096"], "bind btt0.0", errno.EEXIST, {}),
    (11, N3 + [f"btt-on-media namespace0.0 1.1 {B[0]} 512"], "bind btt0.0", errno.EEXIST, {}),
    (11, N3 + [f"btt-on-media namespace0.0 2.0 {B[0]} 4096"], "bind btt0.0", errno.EEXIST, {}),
    (11, N3 + ["damage namespace0.0 1.1"], "bind btt0.0", errno.EUCLEAN, {}),
    (12, N4, "unbind btt0.0", None, {"namespace0.0/holder": "btt0.0", "namespace0.0/mode":
                                     "safe"}),
    (13, N3, "set btt0.0/namespace ", None,                                 # seed: reset
     {"namespace0.0/holder": "", "btt0.0/uuid": "", "btt0.0/namespace": ""}),
    (13, N4 + ["unbind btt0.0"], "set btt0.0/namespace ", None,            # non-seed: deleted
     {"namespace0.0/holder": "", "region0/btt_seed": "btt0.1"}),
    (13, N4, "set btt0.0/namespace ", errno.EBUSY, {}),
    (14, N4, f"set namespace0.0/uuid {U[1]}", errno.EBUSY, {"namespace0.0/uuid": U[0]}),
    (14, N4, f"set namespace0.0/size {128 * MiB}", errno.EBUSY, {}),
    (14, N3, "set namespace0.0/alt_name x", errno.EBUSY, {}),
    (14, N3, "set namespace0.0/sector_size 4096", errno.EBUSY, {}),
    (14, N4, "set namespace0.0/holder_class ", errno.EBUSY, {}),
    (14, N4, "set namespace0.0/force_raw 1", None, {"namespace0.0/force_raw": "1"}),  # not frozen
    (15, N3, "bind namespace0.0", errno.ENXIO, {}),
    (15, N4, "bind namespace0.0", errno.ENXIO, {}),
    (16, N4, f"set btt0.0/uuid {B[1]}", errno.EBUSY, {"btt0.0/uuid": B[0]}),
    (16, N4, "set btt0.0/sector_size 512", errno.EBUSY, {}),
    (16, N4, "set btt0.0/namespace namespace0.1", errno.EBUSY, {}),
    (16, B1, "set btt0.0/sector_size 1024", errno.EINVAL, {}),
    (16, B1, f"set btt0.0/uuid {B[1]}x", errno.EINVAL, {}),
    (17, N4, "region-disable", None, {"region0/namespace_seed": "", "region0/btt_seed": ""}),
    (18, N4 + ["region-disable"], "region-enable", None,
     {"namespace0.0/uuid": U[0], "namespace0.0/holder": "", "region0/namespace_seed":
      "namespace0.1", "region0/btt_seed": "btt0.0"}),
]


@pytest.mark.parametrize("row,setup,action,expect,after", ROWS,
                         ids=[f"row{r[0]}-{i}" for i, r in enumerate(ROWS)])
def test_transition_table(row, setup, action, expect, after):
    region = make_region()
    for step in setup:
        run(region, step)
    if not action:
        pass
    elif expect is None:
        run(region, action)
    else:
        before = {name: dev.__dict__.copy() for name, dev in
                  [*region.namespaces.items(), *region.btts.items()]}
        with pytest.raises(NdError) as e:
            run(region, action)
        assert e.value.errno == expect, e.value
        assert errno.errorcode[expect] in str(e.value)
        after_state = {name: dev.__dict__ for name, dev in
                       [*region.namespaces.items(), *region.btts.items()]}
        assert after_state == before, "a refused operation changed something"
    region.check_invariants()
    for path, value in after.items():
        assert region.get(path) == value, path


# ---- attribute formats and visibility ---------------------------------------------------------

def test_label_less_region_has_one_io_namespace():
    region = make_region(labelled=False)
    assert list(region.namespaces) == ["namespace0.0"]
    assert region.get("region0/namespace_seed") == "" and region.get("region0/nstype") == "4"
    assert region.get("namespace0.0/size") == str(SIZE)
    assert region.get("namespace0.0/devtype") == "nd_namespace_io"
    for hidden in ("uuid", "alt_name", "sector_size"):
        with pytest.raises(NdError) as e:
            region.get(f"namespace0.0/{hidden}")
        assert e.value.errno == errno.ENOENT
    with pytest.raises(NdError) as e:
        region.get("region0/align")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(NdError) as e:
        region.set("namespace0.0/size", "4096")
    assert e.value.errno == errno.EACCES
    with pytest.raises(NdError) as e:  # deviation: refused without a half-applied change
        region.set("namespace0.0/holder_class", "btt")
    assert e.value.errno == errno.ENXIO and region.get("namespace0.0/holder_class") == ""
    # a BTT on an io namespace is 1.1 with a null parent_uuid, as Linux lays it out
    for step in B1 + ["set btt0.0/namespace namespace0.0", "bind btt0.0"]:
        run(region, step)
    (offset, version), info = next(iter(region.media.btts.items()))
    assert (offset, version, info["parent_uuid"].int) == (0, "1.1", 0)


def test_region_attributes():
    region = make_region()
    assert region.get("region0/size") == str(SIZE)
    assert region.get("region0/align") == "0x1000000"
    assert region.get("region0/read_only") == "0"
    assert region.get("region0/init_namespaces") == "0/0"
    region.set("region0/align", "0x200000")
    assert region.get("region0/align") == "0x200000"
    for bad in ("0x3000", "0x800", str(2 * SIZE), "x"):
        with pytest.raises(NdError) as e:
            region.set("region0/align", bad)
        assert e.value.errno == errno.EINVAL
    region.set("region0/read_only", "on")
    assert region.get("region0/read_only") == "1"
    with pytest.raises(NdError) as e:
        region.set("region0/size", "1")
    assert e.value.errno == errno.EACCES
    with pytest.raises(NdError) as e:
        region.get("region0/bogus")
    assert e.value.errno == errno.ENOENT and "available_size" in str(e.value)
    with pytest.raises(NdError) as e:
        region.get("nosuch0.0/size")
    assert e.value.errno == errno.ENODEV and "namespace0.0" in str(e.value)
    with pytest.raises(NdError) as e:
        region.get("namespace0.0")
    assert e.value.errno == errno.EINVAL
    region.disable()
    with pytest.raises(NdError) as e:
        region.get("region0/init_namespaces")
    assert e.value.errno == errno.ENXIO


def test_parsers():
    assert parse_u64("0x10\n") == 16 and parse_u64("010") == 8 and parse_u64("10") == 10
    for bad in ("", "-1", "0x", "1.5", "ten"):
        with pytest.raises(NdError):
            parse_u64(bad)
    with pytest.raises(NdError) as e:
        parse_u64(str(1 << 64))
    assert e.value.errno == errno.ERANGE
    assert parse_uuid("11:11:11:11:22:22:33:33:44:44:55:55:55:55:55:55") == \
        uuid.UUID("11111111-2222-3333-4444-555555555555")
    assert [parse_bool(v) for v in ("1", "Y", "on", "0", "n", "off")] == [True] * 3 + [False] * 3
    with pytest.raises(NdError):
        parse_bool("maybe")


def test_allocation_is_first_fit_and_contiguous():
    region = make_region()
    run(region, f"set namespace0.0/uuid {U[0]}")
    run(region, f"set namespace0.0/size {64 * MiB}")
    run(region, "bind namespace0.0")
    run(region, f"set namespace0.1/uuid {U[1]}")
    run(region, f"set namespace0.1/size {64 * MiB}")
    assert region.get("namespace0.1/resource") == hex(64 * MiB)
    run(region, "unbind namespace0.0")
    run(region, f"set namespace0.0/size {32 * MiB}")      # shrink in place
    with pytest.raises(NdError) as e:                    # cannot grow past namespace0.1
        run(region, f"set namespace0.0/size {96 * MiB}")
    assert e.value.errno == errno.ENOSPC
    run(region, f"set namespace0.1/size {192 * MiB}")    # grows in place to the end
    assert region.get("region0/available_size") == str(32 * MiB)
    assert region.get("region0/max_available_extent") == str(32 * MiB)


def test_identity_changes_are_written_through_and_survive_a_restart():
    region = make_region()
    for step in N1 + ["set namespace0.0/alt_name db", "set namespace0.0/sector_size 4096",
                      "set namespace0.0/holder_class btt"]:
        run(region, step)
    [label] = region.store.labels
    assert (str(label.uuid), label.name, label.size, label.lbasize, label.claim_class) == \
        (U[0], "db", 64 * MiB, 4096, "btt2")
    again = Region(region.store, region.media, autobind=False)
    again.check_invariants()
    assert again.get("namespace0.0/alt_name") == "db"
    assert again.get("namespace0.0/holder_class") == "btt"
    run(again, f"set namespace0.0/uuid {U[2]}")   # relabel: the old label goes
    assert [str(label.uuid) for label in again.store.labels] == [U[2]]


def test_v11_labels_cannot_record_a_claim_class():
    region = make_region(version="1.1")
    for step in N1 + ["set namespace0.0/holder_class btt"]:
        run(region, step)
    assert region.store.labels[0].claim_class == "none"
    assert region.get("namespace0.0/holder_class") == "btt"  # in memory, until a restart


def test_a_failed_label_write_changes_nothing():
    region = make_region()
    for step in N1:
        run(region, step)
    region.store.fail_with = LabelError(errno.ENOSPC, "all label slots are in use")
    with pytest.raises(NdError) as e:
        region.set("namespace0.0/alt_name", "db")
    assert e.value.errno == errno.ENOSPC and region.get("namespace0.0/alt_name") == ""
    region.store.fail_with = OSError(errno.EIO, "disk on fire")
    with pytest.raises(NdError) as e:
        region.set("namespace0.0/size", str(128 * MiB))
    assert e.value.errno == errno.EIO and region.get("namespace0.0/size") == str(64 * MiB)
    region.check_invariants()


def test_autobind_on_region_enable_and_stable_btt_names():
    region = make_region()
    for step in N4:
        run(region, step)
    region.disable()
    region.enable(autobind=True)
    region.check_invariants()
    assert region.get("namespace0.0/holder") == "btt0.0"      # the same name as before
    assert region.namespaces["namespace0.0"].active_mode == "sector"
    assert region.get("region0/init_namespaces") == "1/1"
    region.media.damaged.add((0, "1.1"))
    region.disable()
    region.enable(autobind=True)
    assert region.probe_errors["namespace0.0"].errno == errno.EUCLEAN
    assert region.namespaces["namespace0.0"].active_mode is None


def test_with_a_real_region_file(tmp_path):
    """AreaStore + FileMedia: a labelled region file as QEMU would see it, end to end."""
    path = tmp_path / "region.img"
    LabelArea.create(path, 64 * MiB).close()
    region = Region(AreaStore(LabelArea.detect(path)), FileMedia(path), autobind=False)
    for step in N1 + ["set namespace0.0/holder_class btt", "set namespace0.0/alt_name db"] + B1 \
            + ["set btt0.0/namespace namespace0.0", "bind btt0.0"]:
        run(region, step)
    assert int(region.get("btt0.0/size")) > 60 * MiB
    from btt_core import probe
    found = probe(str(path), 0, 64 * MiB, "2.0")  # BTT2 class: a BTT 2.0 at offset 0
    assert found["parent_uuid"] == U[0] and found["uuid"] == B[0]
    restarted = Region(AreaStore(LabelArea.detect(path)), FileMedia(path))
    restarted.check_invariants()
    assert restarted.get("namespace0.0/alt_name") == "db"
    assert restarted.namespaces["namespace0.0"].active_mode == "sector"
    assert restarted.get("btt0.0/uuid") == B[0]


# ---- stateful: random API calls against a reference model -----------------------------------

NS_NAMES = [f"namespace0.{i}" for i in range(4)]
BTT_NAMES = [f"btt0.{i}" for i in range(3)]


class RegionMachine(RuleBasedStateMachine):
    """Drives the public API at random. The reference model is small on purpose: it knows
    which namespaces are frozen (claimed or enabled) and what their labels must say, and
    predicts the errno of those refusals; the model's own invariants cover the rest."""

    def __init__(self):
        super().__init__()
        self.region = make_region(size=128 * MiB)
        self.region.set("region0/align", hex(4 * MiB))
        # reference: uuid -> (name, size, alt_name, sector_size) of every labelled namespace
        self.ref_labels = {}

    def frozen(self, name):
        ns = self.region.namespaces.get(name)
        return ns is not None and (ns.bound or ns.claim is not None)

    def attempt(self, action, *args, busy=False):
        """Calls action; a frozen target must give EBUSY and change no label."""
        labels_before = self.labels()
        try:
            action(*args)
        except NdError as e:
            assert e.errno != 0 and errno.errorcode[e.errno] in str(e)
            assert self.labels() == labels_before, "a refusal changed the labels"
            if busy:
                assert e.errno == errno.EBUSY, e
            return False
        assert not busy, f"{args} succeeded on a frozen namespace"
        return True

    def labels(self):
        return sorted((str(label.uuid), label.size, label.name, label.lbasize, label.claim_class)
                      for label in self.region.store.labels)

    def sync_ref(self, name):
        """After a successful identity write, the reference learns the namespace's label."""
        ns = self.region.namespaces.get(name)
        self.ref_labels = {u: v for u, v in self.ref_labels.items() if v[0] != name}
        if ns is not None and ns.uuid is not None and ns.size:
            self.ref_labels[str(ns.uuid)] = (name, ns.size, ns.alt_name, ns.sector_size)

    # Macros: single rules that reach the deeper states (configured, claimed, active)
    # often enough; the single-attribute rules below then poke at them.

    @initialize()
    def configure_the_seed(self):
        self.configure("namespace0.0", U[0], 32)

    @rule(name=st.sampled_from(NS_NAMES[:3]), u=st.sampled_from(U[:4]),
          mib=st.sampled_from([16, 32, 48]))
    def configure(self, name, u, mib):
        self.set_uuid(name, u)
        self.set_size(name, mib)

    @rule(btt=st.sampled_from(BTT_NAMES[:2]), name=st.sampled_from(NS_NAMES[:3]),
          u=st.sampled_from(B[:3]), ss=st.sampled_from(["512", "4096"]))
    def claim_and_enable(self, btt, name, u, ss):
        self.configure_btt(btt, u, ss)
        self.attach(btt, name)
        self.bind(btt)

    @rule(name=st.sampled_from(NS_NAMES), u=st.sampled_from(U[:4] + ["junk"]))
    def set_uuid(self, name, u):
        busy = self.frozen(name)
        if self.attempt(self.region.set, f"{name}/uuid", u, busy=busy):
            self.sync_ref(name)

    @rule(name=st.sampled_from(NS_NAMES), mib=st.sampled_from([0, 4, 6, 16, 20, 64, 200]))
    def set_size(self, name, mib):
        if self.attempt(self.region.set, f"{name}/size", str(mib * MiB),
                        busy=self.frozen(name)):
            self.sync_ref(name)

    @rule(name=st.sampled_from(NS_NAMES), text=st.sampled_from(["", "db", "x" * 70]))
    def set_alt_name(self, name, text):
        if self.attempt(self.region.set, f"{name}/alt_name", text, busy=self.frozen(name)):
            self.sync_ref(name)

    @rule(name=st.sampled_from(NS_NAMES), value=st.sampled_from(["512", "4096", "520"]))
    def set_sector_size(self, name, value):
        if self.attempt(self.region.set, f"{name}/sector_size", value, busy=self.frozen(name)):
            self.sync_ref(name)

    @rule(name=st.sampled_from(NS_NAMES), value=st.sampled_from(["btt", "", "pfn", "nope"]))
    def set_holder_class(self, name, value):
        self.attempt(self.region.set, f"{name}/holder_class", value, busy=self.frozen(name))

    @rule(name=st.sampled_from(NS_NAMES), value=st.sampled_from(["0", "1"]))
    def set_force_raw(self, name, value):
        self.attempt(self.region.set, f"{name}/force_raw", value)

    @rule(btt=st.sampled_from(BTT_NAMES), u=st.sampled_from(B[:3]),
          ss=st.sampled_from(["512", "4096"]))
    def configure_btt(self, btt, u, ss):
        bound = btt in self.region.btts and self.region.btts[btt].bound
        self.attempt(self.region.set, f"{btt}/uuid", u, busy=bound)
        self.attempt(self.region.set, f"{btt}/sector_size", ss, busy=bound)

    @rule(btt=st.sampled_from(BTT_NAMES), name=st.sampled_from(NS_NAMES + [""]))
    def attach(self, btt, name):
        dev = self.region.btts.get(btt)
        target = self.region.namespaces.get(name)
        busy = dev is not None and (dev.bound or (name and dev.ndns is not None
                                                  and dev.ndns is not target))
        if self.attempt(self.region.set, f"{btt}/namespace", name, busy=busy) and name:
            assert self.region.namespaces[name].claim is dev

    @rule(name=st.sampled_from(NS_NAMES + BTT_NAMES))
    def bind(self, name):
        dev = self.region.namespaces.get(name)
        claimed = dev is not None and dev.claim is not None and not dev.bound
        try:
            self.region.bind(name)
        except NdError as e:
            if claimed:
                assert e.errno == errno.ENXIO
            return
        assert not claimed

    @rule(name=st.sampled_from(NS_NAMES + BTT_NAMES))
    def unbind(self, name):
        self.attempt(self.region.unbind, name)

    @rule(autobind=st.booleans())
    def restart_region(self, autobind):
        self.region.disable()
        self.region.check_invariants()
        self.region.enable(autobind=autobind)
        # what the labels said comes back, under namespace names in offset order
        found = {str(ns.uuid): (ns.size, ns.alt_name, ns.sector_size)
                 for ns in self.region.namespaces.values() if ns.uuid}
        assert found == {u: v[1:] for u, v in self.ref_labels.items()}
        self.ref_labels = {str(ns.uuid): (ns.name, ns.size, ns.alt_name, ns.sector_size)
                           for ns in self.region.namespaces.values() if ns.uuid}

    @precondition(lambda self: self.region.media.btts)
    @rule(data=st.data())
    def damage_a_btt(self, data):
        key = data.draw(st.sampled_from(sorted(self.region.media.btts)))
        self.region.media.damaged.add(key)

    @invariant()
    def model_invariants(self):
        self.region.check_invariants()
        for ns in self.region.namespaces.values():  # --hypothesis-show-statistics: coverage
            event(f"namespace state {ns.state}")

    @invariant()
    def labels_match_the_reference(self):
        assert {row[0]: (row[1], row[2], row[3]) for row in self.labels()} == \
            {u: v[1:] for u, v in self.ref_labels.items()}


RegionMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50,
                                           deadline=None)
test_region_state_machine = RegionMachine.TestCase
