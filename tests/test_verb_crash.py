"""Crash states over the recorded writes of the namespace verbs (issue 16, item 3).

Each verb runs once on a recording memory image that holds the whole region file: the
namespaces' bytes and the label area at its end, so BTT formats, info-block erases and label
writes land in one record, in issue order. A crash state is then built from that record:

* every prefix of the writes (kill -9: the page cache keeps whatever was issued);
* every write torn into 512-byte pieces, some of which land, after the writes before it;
* power loss: everything up to the last completed sync, plus any subset of the later
  writes (random subsets, torn).

Each state is reopened as a server would at start (labels read, every namespace enabled and
autodetected) and must show exactly the old or the new set of namespaces (uuid, name,
extent, sector size, mode, BTT), each sector namespace a valid BTT, and every namespace's
data as it was (the verb's own victim excepted once it is gone). A mutation check proves the
harness fails on the old write orders.
"""
import errno
import os
import random

import pytest

from btt_core import Btt, BttError, Io
from control import verbs
from control.verbs import handle
from nvdimm.labels import LabelArea
from nvdimm.media import IoMedia
from nvdimm.region import Region
from nvdimm.stores import AreaStore
from plugin.exports import Registry

from conftest import MiB, pattern
from crashsim import sectors

LONG = bool(os.environ.get("BTT_LONG"))
AREA = 128 * 1024
PMEM = 96 * MiB
POWER_STATES = 500 if LONG else 40  # random power-loss states per verb, beyond the prefixes
TORN_PER_WRITE = 20 if LONG else 4
TOTAL = {"states": 0}


def open_registry(io, autobind):
    region = Region(AreaStore(LabelArea(io, AREA)), IoMedia(io), autobind=autobind)
    region.path = "memory"
    registry = Registry(serving=False)
    registry.regions.append(region)
    return registry, region


def write_data(io, ns):
    """A pattern naming each block, through the BTT for a sector namespace."""
    if ns["mode"] == "sector":
        b = Btt.open_io(io, offset=ns["offset"], size=ns["raw_size"], durability="strict")
        try:
            for lba in (0, 1, b.nlba - 1):
                b.write(lba, pattern(1, lba, b.sector_size))
        finally:
            b.close()
    else:
        for off in (0, 4096, ns["raw_size"] - 4096):
            io.write(ns["offset"] + off, pattern(2, off, 4096))


def read_data(io, offset, size, mode):
    if mode == "sector":
        b = Btt.open_io(io, offset=offset, size=size, readonly=True, durability="none")
        try:
            return {lba: b.read(lba, 1) for lba in (0, 1, b.nlba - 1)}
        finally:
            b.close()
    return {off: io.read(offset + off, 4096) for off in (0, 4096, size - 4096)}


def base_image():
    """keep (sector, 32M), victim (sector, 16M), plain (raw, 16M), 32M free; data in each."""
    io = Io.memory(PMEM + AREA)
    LabelArea.format_medium(io, AREA)
    registry, _ = open_registry(io, autobind=False)
    for req in ({"size": "32M", "name": "keep"}, {"size": "16M", "name": "victim"},
                {"size": "16M", "name": "plain", "mode": "raw", "sector_size": 512}):
        write_data(io, handle(registry, {"op": "create-namespace", "mode": "sector", **req}))
    return io


def snapshot(io):
    """What a server starting on this image serves: {uuid: facts}, plus each namespace's
    data (for a sector namespace, only if its BTT opens and checks clean)."""
    _, region = open_registry(io, autobind=True)
    out, data = {}, {}
    for ns in region.namespaces.values():
        if not ns.configured:
            continue
        err = region.probe_errors.get(ns.name)
        btt = ns.claim.info if ns.claim is not None and ns.claim.bound else None
        out[str(ns.uuid)] = (ns.alt_name, ns.offset, ns.size, ns.sector_size, ns.active_mode,
                             btt and (str(btt["uuid"]), btt["sector_size"]),
                             err and errno.errorcode[err.errno])
        if ns.active_mode == "sector":
            b = Btt.open_io(io, offset=ns.offset, size=ns.size, readonly=True,
                            durability="none")
            try:
                assert b.check()["clean"], f"{ns.alt_name}: BTT does not check clean"
            finally:
                b.close()
        if ns.active_mode:
            data[str(ns.uuid)] = read_data(io, ns.offset, ns.size, ns.active_mode)
    return out, data


# ---- recording a verb and building crash images ------------------------------------------

def record(base, req):
    io = base.clone()
    registry, _ = open_registry(io, autobind=False)
    io.set_recording(True)
    handle(registry, req)
    records = io.records()
    io.close()
    return records


def crash_images(base, records, rng):
    """(description, image) for every crash state the module docstring lists."""
    writes = [(i, off, data) for i, (_, kind, off, data) in enumerate(records) if kind == "write"]

    def image(applied):
        img = base.clone()
        for off, data in applied:
            img.poke(off, data)
        return img

    for k in range(len(writes) + 1):
        yield f"prefix of {k} writes", image([(o, d) for _, o, d in writes[:k]])
    for k, (_, off, data) in enumerate(writes):
        pieces = sectors(off, data)
        for _ in range(TORN_PER_WRITE if len(pieces) > 1 else 0):
            some = [p for p in pieces if rng.random() < 0.5]
            yield (f"write {k} ({len(data)} bytes at {off}) torn",
                   image([(o, d) for _, o, d in writes[:k]] + some))
    syncs = [i for i, (_, kind, _, _) in enumerate(records) if kind == "sync"]
    for _ in range(POWER_STATES):
        clock = rng.randrange(len(records) + 1)
        last = max((i for i in syncs if i < clock), default=-1)
        applied = [(o, d) for i, o, d in writes if i < last]
        for i, o, d in writes:
            if last < i < clock and rng.random() < 0.5:
                applied += [p for p in sectors(o, d) if rng.random() < 0.8]
        yield f"power loss before record {clock} (last sync {last})", image(applied)


def explore(base, req, victim, seed=1, pending_ok=False):
    """Checks every crash state of `req` on `base`; returns (states, problems)."""
    old, old_data = snapshot(base)
    records = record(base, req)
    final = base.clone()
    for _, kind, off, data in records:
        if kind == "write":
            final.poke(off, data)
    new, new_data = snapshot(final)
    assert all(f[-1] is None for f in [*old.values(), *new.values()]), (old, new)
    assert old != new, "the verb changed nothing"
    problems, states = [], 0
    for what, img in crash_images(base, records, random.Random(seed)):
        states += 1
        try:
            got, data = snapshot(img)
        except (AssertionError, BttError, OSError) as e:
            problems.append(f"{what}: reopening failed: {e}")
            continue
        finally:
            img.close()
        if got == old:
            want = old_data
        elif got == new:
            want = new_data
        elif pending_ok and _pending(got, new):
            want = {u: d for u, d in new_data.items() if u in data}
        else:
            problems.append(f"{what}: neither old nor new:\n  got {got}\n  old {old}\n  "
                            f"new {new}")
            continue
        for u, expected in want.items():
            if u not in victim(old, new) and data.get(u) != expected:
                problems.append(f"{what}: {got[u][0]}'s data changed")
    TOTAL["states"] += states
    return states, problems


def _pending(got, new):
    """A reconfigure between its commit and the end of its re-format: the new set, with
    the reconfigured namespace refused (never served raw over the old BTT's metadata)."""
    if got.keys() != new.keys():
        return False
    diff = [u for u in got if got[u] != new[u]]
    return len(diff) == 1 and got[diff[0]][4] is None and \
        got[diff[0]][6] in ("ENXIO", "EUCLEAN") and got[diff[0]][:4] == new[diff[0]][:4]


def changed(old, new):
    """The namespaces a verb changes: their data is not promised in the new state."""
    return {u for u in old.keys() | new.keys() if old.get(u) != new.get(u)}


VERBS = {
    "create sector": ({"op": "create-namespace", "mode": "sector", "size": "16M",
                       "name": "new"}, False),
    "create raw": ({"op": "create-namespace", "mode": "raw", "size": "32M", "name": "new"},
                   False),
    "destroy sector": ({"op": "destroy-namespace", "namespace": "victim"}, False),
    "destroy raw": ({"op": "destroy-namespace", "namespace": "plain"}, False),
    "rename": ({"op": "set", "path": "namespace0.1/alt_name", "value": "renamed"}, False),
    "reconfigure sector to raw": ({"op": "create-namespace", "reconfig": "victim",
                                   "mode": "raw"}, True),
    "reconfigure raw to sector": ({"op": "create-namespace", "reconfig": "plain",
                                   "mode": "sector", "sector_size": 512}, True),
    "reconfigure sector, new sector size": ({"op": "create-namespace", "reconfig": "victim",
                                             "sector_size": 512, "name": "v2"}, True),
    "reconfigure shrink": ({"op": "create-namespace", "reconfig": "keep", "size": "16M"},
                           True),
}


@pytest.fixture(scope="module")
def base():
    io = base_image()
    yield io
    io.close()


@pytest.mark.parametrize("verb", VERBS)
def test_verb_crash_states(base, verb):
    req, pending_ok = VERBS[verb]
    states, problems = explore(base, req, changed, pending_ok=pending_ok)
    assert states > 10
    assert not problems, "\n".join(problems[:5])


def test_verb_crash_state_count():
    """How many verb crash states the default suite checks (printed with -s)."""
    if TOTAL["states"] == 0:
        pytest.skip("run together with test_verb_crash_states")
    print(f"\nverb crash states checked: {TOTAL['states']}")
    assert TOTAL["states"] >= (5_000 if LONG else 500)


# ---- mutation checks: the old orders must be caught ---------------------------------------

def commit_first(prepare, commit, cleanup):
    """create's old order: the label named the namespace before its BTT was laid down."""
    commit()
    prepare()
    cleanup()


def cleanup_first(prepare, commit, cleanup):
    """destroy's old order: info blocks erased while the label still named them."""
    prepare()
    cleanup()
    commit()


@pytest.mark.parametrize("verb, mutation", [("create sector", commit_first),
                                            ("destroy sector", cleanup_first)])
def test_harness_catches_the_old_orders(base, monkeypatch, verb, mutation):
    monkeypatch.setattr(verbs, "_steps", mutation)
    req, pending_ok = VERBS[verb]
    _, problems = explore(base, req, changed, pending_ok=pending_ok)
    assert any("neither old nor new" in p for p in problems), \
        f"{mutation.__name__} on {verb} went unnoticed"


def test_a_reformat_stops_the_old_btt_opening_before_it_touches_its_metadata():
    """Reconfiguring over an existing BTT (label-less, or with its own uuid back) must not
    leave the old info block valid over half-new map and flog: the first writes, synced
    before any other, zero the old primary info blocks."""
    import uuid as uuidlib
    io = Io.memory(64 * MiB)
    media = IoMedia(io)
    media.format(0, 64 * MiB, version="1.1", uuid=uuidlib.uuid4(),
                 parent_uuid=uuidlib.UUID(int=0), sector_size=4096)
    io.set_recording(True)
    media.format(0, 64 * MiB, version="1.1", uuid=uuidlib.uuid4(),
                 parent_uuid=uuidlib.UUID(int=0), sector_size=512, old_size=64 * MiB)
    records = io.records()
    first_sync = next(i for i, r in enumerate(records) if r[1] == "sync")
    before = records[:first_sync]
    assert {off for _, kind, off, _ in before} == {4096}  # BTT 1.1: primary at +4 KiB
    assert all(kind == "write" and not any(data) for _, kind, _, data in before)
    io.close()
