"""Crash-state simulation over the recording memory backend (docs/engine.md, "Proof").

A workload runs once against a memory image that records every write and every completed
sync, of the region and of the intent journal, on one shared clock. A crash at clock P
then yields images:

* power loss: everything the region held at its last completed sync before P, plus any
  subset of the later writes, each possibly torn at 512-byte boundaries (8-byte aligned
  stores therefore stay whole); the journal, never synced, keeps any torn subset of its
  writes. The reboot may (boot id differs) or may not be noticed: both must recover.
* process crash (kill -9): every write issued before P, in full (the page cache keeps
  them), same boot.

Each image is reopened (recovery and journal replay run) and checked against a model:
every sector reads one whole version that was written to it (or its initial content), at
least as new as the last version that had to be durable; and every internal block is
referenced exactly once by the map plus the free lists.
"""
from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass, field

from btt_core import Btt, BttError, Io, check_io
from btt_core.replay import sector_pieces, torn

from testbuild import commit_step, mutated, set_map_flags

MiB = 1 << 20
EIO = "EIO"
E_FLAG, Z_FLAG = 0x40000000, 0x80000000


@dataclass(frozen=True)
class Geometry:
    size: int
    lbasize: int = 4096
    version: str = "1.1"
    arena_max: int = 0


GEOMETRIES = [
    Geometry(20 * MiB),
    Geometry(20 * MiB, 512, "2.0"),
    Geometry(36 * MiB, 4096, "2.0", 16 * MiB),  # two arenas
]


@dataclass
class Op:
    kind: str  # "write" | "zero" (zero-flag extension) | "flush" | "step" (of a commit)
    lba: int = 0
    n: int = 0
    fua: bool = False
    start: int = 0
    end: int = 0
    error: str = ""


@dataclass
class Recording:
    geo: Geometry
    durability: str
    pre_io: Io
    pre_journal: Io
    ops: list[Op]
    records: list  # (clock, "d"|"j", kind, offset, data), sorted by clock
    end_clock: int
    sector_size: int
    versions: dict = field(default_factory=dict)  # lba -> [(op index or -1, content)]
    mutation: str | None = None  # the broken engine (testbuild.py) recovers the images too


def _mutated(name: str | None):
    """The engine as the recording was made: correct, or broken by a mutation."""
    return mutated(name) if name else contextlib.nullcontext()


def record(geo: Geometry, durability: str, ops: list[Op], preflags: dict | None = None,
           mutation: str | None = None, threads: list[int] | None = None) -> Recording:
    """Runs ops once, recording; the handle is then abandoned as a crash would leave it.

    With `threads` (one thread number per op), each thread runs its own ops in order, all
    threads at once: the engine's C code runs truly in parallel (cffi releases the GIL), and
    the recording's shared clock orders what they wrote. The model needs each LBA to be
    written by one thread only (the caller's ops must keep to that); lanes, epochs, commits
    and the journal are shared."""
    io = Io.memory(geo.size)
    Btt.format_io(io, size=geo.size, sector_size=geo.lbasize, version=geo.version,
                  arena_max=geo.arena_max)
    b = Btt.open_io(io, durability="strict")
    ss = b.sector_size
    for lba, flags in (preflags or {}).items():
        set_map_flags(b, lba % b.nlba, flags)
    initial = {}
    for op in ops:
        if op.kind in ("write", "zero"):
            op.lba = min(op.lba % b.nlba, b.nlba - op.n)
    touched = {op.lba + i for op in ops if op.kind in ("write", "zero") for i in range(op.n)}
    for lba in touched | {flagged % b.nlba for flagged in (preflags or {})}:
        try:
            initial[lba] = b.read(lba, 1)
        except BttError:
            initial[lba] = EIO
    b.close()

    journal = Io.memory(1 << 20)
    b = Btt.open_io(io, durability=durability, journal=journal)
    pre_io, pre_journal = io.clone(), journal.clone()
    if threads is not None:
        io.set_sync_delay(200)  # commits take time: other threads write into them
    io.set_recording(True)
    journal.set_recording(True)
    versions = {lba: [(-1, content)] for lba, content in initial.items()}
    with _mutated(mutation):
        if threads is None:
            for i, op in enumerate(ops):
                _run(b, i, op, versions, ss)
        else:
            _run_in_threads(b, ops, threads, versions, ss)
    b.abandon()
    recs = [(c, "d", k, off, data) for c, k, off, data in io.records()]
    recs += [(c, "j", k, off, data) for c, k, off, data in journal.records()]
    recs.sort()
    end = Io.clock()
    io.close()
    journal.close()
    return Recording(geo, durability, pre_io, pre_journal, ops, recs, end, ss, versions, mutation)


def _run(b: Btt, i: int, op: Op, versions: dict, ss: int) -> None:
    """Runs ops[i] and notes its clock span and the versions it may leave."""
    op.start = Io.clock()
    try:
        if op.kind in ("write", "zero"):
            if op.kind == "write":
                data = b"".join(_content(i, op.lba + k, ss) for k in range(op.n))
            else:
                data = bytes(op.n * ss)
            for k in range(op.n):
                versions[op.lba + k].append((i, data[k * ss:(k + 1) * ss]))
            if op.kind == "write":
                b.write(op.lba, data, fua=op.fua)
            else:
                b.set_zero(op.lba, op.n, fua=op.fua)
        elif op.kind == "step":
            # The committer's commit, one step at a time: the writes that follow are
            # staged in the next epoch while it is open (a write that must wait for it
            # runs the remaining steps).
            commit_step(b)
        else:
            b.flush()
    except BttError as e:
        op.error = str(e)
    op.end = Io.clock()


def _run_in_threads(b: Btt, ops: list[Op], threads: list[int], versions: dict, ss: int) -> None:
    mine: dict[int, list[int]] = {}
    for i, t in enumerate(threads):
        mine.setdefault(t, []).append(i)
    go = threading.Barrier(len(mine))

    def worker(indices):
        go.wait()
        for i in indices:
            _run(b, i, ops[i], versions, ss)

    workers = [threading.Thread(target=worker, args=(ix,)) for ix in mine.values()]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _content(op_index: int, lba: int, size: int) -> bytes:
    head = f"op{op_index:06d}-lba{lba:09d}|".encode()
    return (head * (size // len(head) + 1))[:size]


def sectors(off: int, data: bytes) -> list[tuple[int, bytes]]:
    """A write cut at 512-byte boundaries: the pieces a power cut may keep or lose."""
    return [(pos, data[pos - off:pos - off + n]) for pos, n in sector_pieces(off, len(data))]


def _torn(rng: random.Random, off: int, data: bytes):
    """The 512-byte-aligned pieces of a write that reach the media: any subset."""
    return [(pos, data[pos - off:pos - off + n]) for pos, n in torn(rng, off, len(data))]


def crash_images(rec: Recording, clock: int, kind: str, rng: random.Random):
    """(region image, journal image, same_boot) for a crash at `clock`."""
    io, journal = rec.pre_io.clone(), rec.pre_journal.clone()
    target = {"d": io, "j": journal}
    if kind == "process":
        for c, t, k, off, data in rec.records:
            if c < clock and k == "write":
                target[t].poke(off, data)
        return io, journal, True
    last_sync = max((c for c, t, k, _, _ in rec.records if c < clock and t == "d" and k == "sync"),
                    default=-1)
    for c, t, k, off, data in rec.records:
        if c >= clock or k != "write":
            continue
        if t == "d" and c < last_sync:
            target[t].poke(off, data)
        else:
            for pos, piece in _torn(rng, off, data):
                target[t].poke(pos, piece)
    return io, journal, rng.random() < 0.5


def required_index(rec: Recording, lba: int, clock: int, kind: str) -> int:
    """The op index of the newest version of lba that must survive a crash at clock."""
    flush_done = [op for op in rec.ops if op.kind == "flush" and op.end <= clock and not op.error]
    need = -1
    for idx, _ in rec.versions[lba][1:]:
        op = rec.ops[idx]
        if op.error or op.end > clock:
            continue
        if kind == "process" or rec.durability == "strict" or op.fua or \
                any(op.end <= f.start for f in flush_done):
            need = idx
    return need


def describe(rec: Recording, content) -> str:
    """Names a sector's content: a version of some write, the initial data, or a tear."""
    if content == EIO:
        return "EIO"
    if content is not None and not any(content):
        return "zeros"
    for lba, versions in rec.versions.items():
        for idx, data in versions:
            if data == content:
                return f"LBA {lba}'s initial data" if idx < 0 else f"op {idx}'s data for LBA {lba}"
    for lba, versions in rec.versions.items():
        for idx, data in versions:
            if data != EIO and data is not None and data[:64] == content[:64]:
                return f"a torn sector starting like op {idx}'s data for LBA {lba}"
    return f"unknown data {content[:16]!r}"


def verify(rec: Recording, clock: int, kind: str, rng: random.Random) -> list[str]:
    """Recovers one crash image and returns what is wrong with it (empty list: correct)."""
    io, journal, same_boot = crash_images(rec, clock, kind, rng)
    boot = None if same_boot else bytes(16)
    problems = []
    # Before recovery, the offline checker may find only what recovery repairs.
    offline = check_io(io)
    left = [f for f in offline["findings"] if f["severity"] == "error"
            and f["problem"] != "interrupted-write"]
    if left:
        problems.append(f"{kind} crash at {clock}: offline check before recovery: {left[:3]}")
    try:
        with _mutated(rec.mutation):
            b = Btt.open_io(io, durability=rec.durability, journal=journal, boot=boot)
    except BttError as e:
        return [f"{kind} crash at {clock}: recovery failed: {e}"]
    try:
        for lba, versions in rec.versions.items():
            need = required_index(rec, lba, clock, kind)
            allowed = [content for idx, content in versions
                       if idx >= need and (idx < 0 or rec.ops[idx].start < clock)]
            try:
                got = b.read(lba, 1)
            except BttError:
                got = EIO
            if got not in allowed:
                problems.append(f"{kind} crash at {clock}: LBA {lba} reads {describe(rec, got)}, "
                                f"expected one of {[describe(rec, a) for a in allowed]}")
        r = b.check()
        if not r["clean"]:
            problems.append(f"{kind} crash at {clock}: bitmap rule broken: {r['problems'][:3]}")
    finally:
        b.close()
        io.close()
        journal.close()
    return problems


def crash_clocks(rec: Recording) -> list[int]:
    """Every distinct crash point: just before each record, and after the last one."""
    return sorted({c for c, *_ in rec.records} | {rec.end_clock})


def explore(rec: Recording, rng: random.Random, states: int, kinds=("power", "process")):
    """Verifies `states` crash states; returns (states checked, problems)."""
    if rec.durability == "none":
        kinds = tuple(k for k in kinds if k == "process")  # no barriers: no power-loss promise
    every = [(c, k) for c in crash_clocks(rec) for k in kinds]
    plan = every if len(every) <= states else rng.sample(every, states)
    plan += [rng.choice(every) for _ in range(states - len(plan))]  # more torn subsets
    problems = []
    for clock, kind in plan:
        problems += verify(rec, clock, kind, rng)
    return len(plan), problems
