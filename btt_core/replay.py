"""Replaying a write log (docs/write-log.md): every crash state a recorded workload could
have left, recovered and checked.

The log (btt_core/writelog.c) holds the region file's and the intent journal's writes and
completed syncs in the order they happened, and the NBD requests around them. From a copy
of the region file taken before recording began (the base image), the replayer builds, at
each crash point:

* power loss: everything the last completed sync made durable, plus any subset of the
  writes since, whole or torn at 512-byte boundaries; the journal is lost (a power cut may
  lose it), so recovery runs without it;
* kill -9: every write issued before the point, in full (the page cache keeps them), and
  the journal, replayed as on the same boot.

Crash points: just before each sync of the region completes (the whole epoch since the
previous one is uncertain), after each NBD reply, and at the end. Each image is checked
as check-namespace checks it before recovery, then opened (recovery runs) and checked for
the bitmap rule, for every sector reading one whole version written to it (or its base
content), at least as new as the newest version acknowledged durable before the point
(a FUA or strict-mode write's reply, or a later flush's reply), and optionally by a
client-side checker (e2fsck -fn) on the export as the engine reads it.

Memory: the log is memory-mapped and indexed (one small tuple per record; data is read
from the map when applied), the base image is held as copy-on-write pages of what it
stores, plus three working images (durable, all-written, journal) of the pages the log
wrote, and one copy of the export (its base content and the image being checked).
"""
from __future__ import annotations

import bisect
import errno as _errno
import hashlib
import mmap
import os
import random
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field

from ._lib import lib
from .checker import check_io
from .engine import DURABILITY, MAX_REQUEST, Btt, BttError, Io

HEADER_SIZE = lib.BTT_WL_HEADER_SIZE
RECORD = struct.Struct("<IHHQQQQIIII")  # docs/write-log.md, "Records"
FILE_DATA = struct.Struct("<QII16s")
RECORD_MAGIC = 0x524C5742
LOG_MAGIC = b"BTTWLOG1"
LOG_VERSION = 1
DURABILITY_NAMES = {v: k for k, v in DURABILITY.items()}
ROLE_NAMES = {lib.BTT_WL_ROLE_REGION: "region", lib.BTT_WL_ROLE_JOURNAL: "journal"}
TEAR = 512  # the unit a power cut may tear a write into
LOAD_CHUNK = 1 << 20
MAX_LISTED = 20  # failures listed in a report (all are counted)
MAX_FILE_SIZE = 1 << 50  # beyond any region or journal served; a larger FILE size is damage

(WRITE, ZERO, SYNC, FILE, NBD_WRITE, NBD_ZERO, NBD_FLUSH, NBD_REPLY) = (
    lib.BTT_WL_WRITE, lib.BTT_WL_ZERO, lib.BTT_WL_SYNC, lib.BTT_WL_FILE, lib.BTT_WL_NBD_WRITE,
    lib.BTT_WL_NBD_ZERO, lib.BTT_WL_NBD_FLUSH, lib.BTT_WL_NBD_REPLY)


class LogError(BttError):
    """The log cannot be replayed (not a write log, damaged, or not one namespace's)."""


# ---- reading the log -------------------------------------------------------------------

@dataclass
class Target:
    role: str
    durability: str
    ns_offset: int
    ns_size: int
    size: int
    boot: bytes
    name: str


@dataclass
class Request:
    kind: str        # "write" | "zero" | "flush"
    off: int
    length: int
    fua: bool
    issued: int      # record index of the request's mark
    data_pos: int    # where its data starts in the log (writes)
    replied: int | None = None  # record index of its reply
    status: int = -1  # the reply's errno (0: success); -1: no reply recorded
    durable_at: int | None = None  # first crash point that must keep it (power loss)


@dataclass
class Log:
    path: str
    data: mmap.mmap
    # (type, target, id, off, len, aux, data position), one per record, in log order
    records: list
    targets: dict
    requests: list
    truncated: str = ""  # why reading stopped before the end of the file, if it did


def read_log(path) -> Log:
    """Validates and indexes a write log. A damaged tail (the recorder killed mid-append)
    ends the log there and is reported; anything else wrong is a LogError."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE:
            raise LogError(_errno.EINVAL, f"{path} is not a write log (too short)")
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    head = mm[:HEADER_SIZE]
    if head[:8] != LOG_MAGIC:
        raise LogError(_errno.EINVAL, f"{path} is not a write log (bad magic)")
    version, hsize, rsize = struct.unpack_from("<III", head, 8)
    if lib.btt_crc32c(0, head, HEADER_SIZE - 4) != struct.unpack_from("<I", head,
                                                                        HEADER_SIZE - 4)[0]:
        raise LogError(_errno.EUCLEAN, f"{path}: the log header's checksum is wrong")
    if version != LOG_VERSION or hsize != HEADER_SIZE or rsize != RECORD.size:
        raise LogError(_errno.EINVAL, f"{path}: write log version {version} (record size "
                       f"{rsize}) is not the version {LOG_VERSION} this replayer reads")
    log = Log(os.fspath(path), mm, [], {}, [])
    by_id: dict[int, int] = {}
    pos = HEADER_SIZE
    while pos < size:
        problem = _read_record(log, mm, pos, size, by_id)
        if problem:
            log.truncated = f"record {len(log.records)} at byte {pos}: {problem}"
            break
        pos += RECORD.size + log.records[-1][7]
    return log


def _read_record(log: Log, mm, pos: int, size: int, by_id: dict) -> str:
    """Appends the record at pos to the index; returns what is wrong with it instead."""
    if pos + RECORD.size > size:
        return "header cut short"
    (magic, kind, target, seq, rid, off, length, aux, dcrc, dlen,
     hcrc) = RECORD.unpack_from(mm, pos)
    if magic != RECORD_MAGIC or lib.btt_crc32c(0, mm[pos:pos + RECORD.size - 4],
                                               RECORD.size - 4) != hcrc:
        return "bad magic or header checksum"
    if seq != len(log.records):
        return f"sequence number {seq}, expected {len(log.records)}"
    dpos = pos + RECORD.size
    if dpos + dlen > size:
        return "data cut short"
    if dlen and lib.btt_crc32c(0, mm[dpos:dpos + dlen], dlen) != dcrc:
        return "data checksum mismatch"
    index = len(log.records)
    if kind == FILE:
        if dlen < FILE_DATA.size or rid not in ROLE_NAMES or target in log.targets:
            return "malformed FILE record"
        fsize, dur, _, boot = FILE_DATA.unpack_from(mm, dpos)
        if dur not in DURABILITY_NAMES or fsize > MAX_FILE_SIZE or off + length > MAX_FILE_SIZE \
                or (rid == lib.BTT_WL_ROLE_REGION and off + length > fsize):
            return "FILE record with an unknown durability or sizes out of range"
        name = mm[dpos + FILE_DATA.size:dpos + dlen].decode(errors="replace")
        log.targets[target] = Target(ROLE_NAMES[rid], DURABILITY_NAMES[dur], off,
                                     length, fsize, bytes(boot), name)
    elif kind in (WRITE, ZERO, SYNC):
        if target not in log.targets:
            return f"names file {target}, which no FILE record introduced"
        if kind == WRITE and dlen != length:
            return "WRITE record whose data is not its length"
        # The region has the size its FILE record says; the journal may grow, up to the cap.
        limit = log.targets[target].size if log.targets[target].role == "region" else \
            MAX_FILE_SIZE
        if kind != SYNC and off + length > limit:
            return f"{'WRITE' if kind == WRITE else 'ZERO'} record beyond its file's end"
    elif kind in (NBD_WRITE, NBD_ZERO, NBD_FLUSH):
        if kind == NBD_WRITE and dlen != length:
            return "NBD write record whose data is not its length"
        by_id[rid] = len(log.requests)
        log.requests.append(Request({NBD_WRITE: "write", NBD_ZERO: "zero"}.get(kind, "flush"),
                                    off, length, bool(aux & lib.BTT_WL_FUA), index, dpos))
    elif kind == NBD_REPLY:
        req = by_id.get(rid)
        if req is None:
            return f"reply to request {rid}, which was never issued"
        log.requests[req].replied, log.requests[req].status = index, aux
    else:
        return f"unknown record type {kind}"
    log.records.append((kind, target, rid, off, length, aux, dpos, dlen))
    return ""


# ---- the replay ------------------------------------------------------------------------

@dataclass
class Report:
    images: int = 0
    points: int = 0
    failures: int = 0  # problems found, over all images
    failed_images: int = 0
    first_failure: dict | None = None
    listed: list = field(default_factory=list)
    by_kind: dict = field(default_factory=dict)
    fsck_runs: int = 0
    fsck_failures: int = 0
    torn_sectors: int = 0
    lost_durable: int = 0
    truncated: str = ""

    def fail(self, point: int, kind: str, variant: str, problem: str) -> None:
        self.failures += 1
        entry = {"point": point, "kind": kind, "variant": variant, "problem": problem}
        if self.first_failure is None:
            self.first_failure = entry
        if len(self.listed) < MAX_LISTED:
            self.listed.append(entry)

    def as_dict(self) -> dict:
        return {"images": self.images, "points": self.points, "failures": self.failures,
                "failed_images": self.failed_images,
                "first_failure": self.first_failure, "failures_listed": self.listed,
                "images_by_kind": self.by_kind, "fsck_runs": self.fsck_runs,
                "fsck_failures": self.fsck_failures, "torn_sectors": self.torn_sectors,
                "lost_durable_writes": self.lost_durable, "log_truncated": self.truncated}


class Replay:
    """One log over one base image. run() checks every crash point and returns a Report."""

    def __init__(self, log: Log, base_path, *, torn: int = 3, seed: int = 0,
                 fsck: list[str] | None = None, fsck_prepare: list[str] | None = None,
                 max_points: int = 0, kinds=("power", "kill"), workdir=None, progress=None):
        self.log, self.rng = log, random.Random(seed)
        self.torn, self.fsck, self.progress = torn, fsck, progress
        self.fsck_prepare = fsck_prepare
        regions = {(t.name, t.ns_offset, t.ns_size) for t in log.targets.values()
                   if t.role == "region"}
        if len(regions) != 1:
            raise LogError(_errno.EINVAL, f"the log records {len(regions)} BTT namespaces; "
                           "the replayer takes a log of exactly one (serve one namespace "
                           "while recording)")
        region = next(t for t in log.targets.values() if t.role == "region")
        self.region = region
        self.durability = region.durability
        self.kinds = tuple(k for k in kinds if k == "kill" or self.durability != "none")
        self.base = _load_base(base_path, max(t.size for t in log.targets.values()
                                              if t.role == "region"))
        self.max_points, self.workdir = max_points, workdir
        self._split_records()
        b = Btt.open_io(self.base.clone(), offset=region.ns_offset, size=region.ns_size,
                        readonly=True, durability="none")
        try:
            self.ss, self.nlba = b.sector_size, b.nlba
            self.initial = _read_export(b)
            self._buf = bytearray(len(self.initial))
        finally:
            b.close()
        self._index_versions()

    # -- preparing

    def _split_records(self) -> None:
        """Region and journal writes as (index, kind, off, len, data position); region syncs
        as (index, covers): every write before `covers` is durable once the sync is."""
        roles = {t: self.log.targets[t].role for t in self.log.targets}
        self.region_writes: list[tuple] = []
        self.journal_writes: list[tuple] = []
        self.syncs: list[tuple[int, int]] = []
        for i, (kind, target, _, off, length, _aux, dpos, _) in enumerate(self.log.records):
            if kind in (WRITE, ZERO):
                dest = self.region_writes if roles[target] == "region" else self.journal_writes
                dest.append((i, kind, off, length, dpos))
            elif kind == SYNC and roles[target] == "region":
                self.syncs.append((i, off))

    def _index_versions(self) -> None:
        """Per LBA, the requests that wrote it (in issue order), and when each became
        acknowledged-durable: at its reply under strict durability or with FUA, else at the
        reply of the first flush issued after its reply."""
        ss = self.ss
        flushes = sorted((r.issued, r.replied) for r in self.log.requests
                         if r.kind == "flush" and r.status == 0 and r.replied is not None)
        # suffix minimum of flush replies over flushes issued at or after position k
        suffix, best = [], None
        for issued, replied in reversed(flushes):
            best = replied if best is None else min(best, replied)
            suffix.append((issued, best))
        suffix.reverse()
        issued_at = [f[0] for f in suffix]
        self.versions: dict[int, list[int]] = {}
        for n, r in enumerate(self.log.requests):
            if r.kind == "flush":
                continue
            if r.status == 0 and r.replied is not None:
                if self.durability == "strict" or r.fua:
                    r.durable_at = r.replied + 1
                else:
                    k = bisect.bisect_right(issued_at, r.replied)
                    if k < len(suffix):
                        r.durable_at = suffix[k][1] + 1
            if r.off % ss or r.length % ss or r.off + r.length > self.nlba * ss:
                continue  # refused by the engine: it cannot have changed anything
            for lba in range(r.off // ss, (r.off + r.length) // ss):
                self.versions.setdefault(lba, []).append(n)
        self.touched = sorted(self.versions)
        self.written_runs: list[tuple[int, int]] = []  # [lo, hi) LBA runs requests wrote
        for lba in self.touched:
            if self.written_runs and self.written_runs[-1][1] == lba:
                self.written_runs[-1] = (self.written_runs[-1][0], lba + 1)
            else:
                self.written_runs.append((lba, lba + 1))

    def points(self) -> list[int]:
        """Crash points as record counts: the state after records [0, P) happened."""
        pts = {i for i, _ in self.syncs}
        pts |= {r.replied + 1 for r in self.log.requests if r.replied is not None}
        pts.add(len(self.log.records))
        out = sorted(pts)
        if self.max_points and len(out) > self.max_points:
            keep = set(self.rng.sample(out, self.max_points - 1))
            out = sorted(keep | {out[-1]})
        return out

    # -- running

    def run(self) -> Report:
        rep = Report(truncated=self.log.truncated)
        pts = self.points()
        rep.points = len(pts)
        durable, full = self.base.clone(), self.base.clone()
        jsize = max((t.size for t in self.log.targets.values() if t.role == "journal"),
                    default=0)
        journal = Io.memory(max(jsize, 1 << 20))
        d_next = f_next = j_next = s_next = 0
        covered = 0  # every region write before this index is durable
        self._fsck_seen: dict[tuple, bool] = {}
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix="replay-") as tmp:
            self._tmp = tmp
            for done, p in enumerate(pts):
                while s_next < len(self.syncs) and self.syncs[s_next][0] < p:
                    covered = max(covered, self.syncs[s_next][1])
                    s_next += 1
                d_next = self._apply(durable, self.region_writes, d_next, covered)
                f_next = self._apply(full, self.region_writes, f_next, p)
                j_next = self._apply(journal, self.journal_writes, j_next, p)
                if "power" in self.kinds:
                    self._power_images(rep, p, durable, d_next)
                if "kill" in self.kinds:
                    self._check(rep, p, "kill", "all written", full.clone(),
                                journal.clone() if self.journal_writes else None)
                if self.progress:
                    self.progress(done + 1, len(pts), rep)
        for io in (durable, full, journal):
            io.close()
        return rep

    def _apply(self, io: Io, writes: list, start: int, end: int) -> int:
        """Applies writes[start:] issued before record `end`; returns the next to apply."""
        k = start
        while k < len(writes) and writes[k][0] < end:
            self._poke(io, writes[k])
            k += 1
        return k

    def _poke(self, io: Io, w, pieces=None) -> None:
        _, kind, off, length, dpos = w
        if kind == ZERO:
            io.zero(off, length)
            return
        mm = self.log.data
        for pos, n in pieces if pieces is not None else ((off, length),):
            io.poke(pos, mm[dpos + pos - off:dpos + pos - off + n])

    def _power_images(self, rep: Report, p: int, durable: Io, d_next: int) -> None:
        pending = [w for w in self.region_writes[d_next:] if w[0] < p]
        self._check(rep, p, "power", "durable only", durable.clone(), None)
        if not pending:
            return
        img = durable.clone()
        for w in pending:
            self._poke(img, w)
        self._check(rep, p, "power", "all written", img, None)
        for t in range(self.torn):
            img = durable.clone()
            for w in pending:
                pieces = torn(self.rng, w[2], w[3]) if w[1] == WRITE else \
                    ([(w[2], w[3])] if self.rng.random() < 0.5 else [])
                if w[1] == ZERO and pieces:
                    self._poke(img, w)
                elif pieces:
                    self._poke(img, w, pieces)
            self._check(rep, p, "power", f"torn subset {t + 1}", img, None)

    def _check(self, rep: Report, p: int, kind: str, variant: str, img: Io,
               journal: Io | None) -> None:
        rep.images += 1
        rep.by_kind[kind] = rep.by_kind.get(kind, 0) + 1
        before = rep.failures
        try:
            for problem in self._problems(rep, p, kind, img, journal):
                rep.fail(p, kind, variant, problem)
        finally:
            rep.failed_images += rep.failures > before
            img.close()
            if journal is not None:
                journal.close()

    def _problems(self, rep: Report, p: int, kind: str, img: Io, journal: Io | None):
        r = self.region
        offline = check_io(img, offset=r.ns_offset, size=r.ns_size)
        left = [f"{f['problem']}: {f['message']}" for f in offline["findings"]
                if f["severity"] == "error" and f["problem"] != "interrupted-write"]
        if left:
            yield f"check-namespace before recovery: {'; '.join(left[:3])}"
        try:
            b = Btt.open_io(img, offset=r.ns_offset, size=r.ns_size, journal=journal,
                            durability=self.durability,
                            boot=r.boot if journal is not None else bytes(16))
        except BttError as e:
            yield f"recovery failed: {e}"
            return
        try:
            check = b.check()
            if not check["clean"]:
                yield f"bitmap rule broken after recovery: {'; '.join(check['problems'][:3])}"
            got = _read_export(b, self._buf)
        finally:
            b.close()
        matched: list = []  # per written LBA, the version it reads (-1: base) or a digest
        yield from self._sectors(rep, p, kind, got, matched)
        if self.fsck:
            yield from self._client_check(rep, got, tuple(matched))
        # What no request wrote must read its base content: with the written sectors put
        # back to theirs (they are checked above), the whole export compares in one go.
        ss, initial = self.ss, self.initial
        for lo, hi in self.written_runs:
            got[lo * ss:hi * ss] = initial[lo * ss:hi * ss]
        if got != initial:
            first = next(x for x in range(self.nlba) if got[x * ss:(x + 1) * ss] !=
                         initial[x * ss:(x + 1) * ss])
            rep.torn_sectors += 1
            yield f"LBA {first}, never written, changed from its base content"

    def _sectors(self, rep: Report, p: int, kind: str, got: bytearray, matched: list):
        """Each written sector reads a version allowed at p; what each reads goes to matched
        (the version, -1 for its base content, or a digest of what it reads instead)."""
        ss, initial, reqs = self.ss, self.initial, self.log.requests
        for lba in self.touched:
            vers = self.versions[lba]
            need = None
            for n in vers:
                r = reqs[n]
                at = r.replied + 1 if kind == "kill" and r.status == 0 and \
                    r.replied is not None else r.durable_at
                if at is not None and at <= p:
                    need = n  # issue order: the last one found is the newest
            sector = got[lba * ss:(lba + 1) * ss]
            match = need is None and sector == initial[lba * ss:(lba + 1) * ss]
            newest_issued, which = None, -1
            for n in vers:
                r = reqs[n]
                if r.issued >= p or match:
                    break
                newest_issued = which = n
                if need is not None and r.replied is not None and r.replied < reqs[need].issued:
                    continue  # finished before the required version began: superseded
                match = self._holds(r, lba, sector)
            matched.append(which if match else hashlib.blake2b(sector).digest())
            if not match:
                if need is not None and self._is_version(sector, lba, vers, p):
                    rep.lost_durable += 1
                    yield (f"LBA {lba} lost write {need} (acknowledged durable at record "
                           f"{(reqs[need].durable_at or 0) - 1}): it reads an "
                           "older version")
                else:
                    rep.torn_sectors += 1
                    yield f"LBA {lba} reads neither its old nor its new content " \
                          f"(newest write issued: {newest_issued})"

    def _is_version(self, sector, lba: int, vers: list, p: int) -> bool:
        """Whether sector is some version of lba, however old (a lost write, not a tear)."""
        ss = self.ss
        if sector == self.initial[lba * ss:(lba + 1) * ss]:
            return True
        for n in vers:
            r = self.log.requests[n]
            if r.issued >= p:
                break
            if self._holds(r, lba, sector):
                return True
        return False

    def _holds(self, r: Request, lba: int, sector) -> bool:
        """Whether sector is what request r (a write or a zero of lba) wrote there."""
        if r.kind == "zero":
            return not any(sector)
        ss, pos = self.ss, r.data_pos + lba * self.ss - r.off
        return sector == self.log.data[pos:pos + ss]

    def _client_check(self, rep: Report, got: bytearray, key: tuple):
        """The client's own checker (e2fsck -fn ...) on the export as the engine reads it,
        once per distinct content."""
        assert self.fsck is not None
        # key: the content is the base's but for the written sectors, named by the versions
        # they read (_sectors): a key that costs nothing to compute. A difference outside
        # them is reported as a failure anyway.
        ok = self._fsck_seen.get(key)
        if ok is not None:
            if not ok:
                yield f"{self.fsck[0]} failed on this content (seen before)"
            return
        path = os.path.join(self._tmp, "export.img")
        with open(path, "wb") as f:
            f.write(got)
        if self.fsck_prepare:  # e.g. replaying ext4's journal, as a mount would
            subprocess.run([*self.fsck_prepare, path], capture_output=True)
        res = subprocess.run([*self.fsck, path], capture_output=True, text=True)
        ok = self._fsck_seen[key] = res.returncode == 0
        rep.fsck_runs += 1
        if not ok:
            rep.fsck_failures += 1
            tail = [line for line in (res.stdout + res.stderr).splitlines()
                    if line.strip() and not line.startswith(("Pass ", "e2fsck "))][:4]
            yield f"{self.fsck[0]} exited {res.returncode}: {' | '.join(tail)}"


def sector_pieces(off: int, length: int) -> list[tuple[int, int]]:
    """A write cut at 512-byte boundaries: (offset, length) of each piece a power cut may
    keep or lose."""
    pieces, pos = [], off
    while pos < off + length:
        end = min((pos // TEAR + 1) * TEAR, off + length)
        pieces.append((pos, end - pos))
        pos = end
    return pieces


def torn(rng: random.Random, off: int, length: int) -> list[tuple[int, int]]:
    """The pieces of a write that reach the media after a power cut: all, none, or any
    subset (tests/crashsim.py tears its writes with it too)."""
    pieces = sector_pieces(off, length)
    mode = rng.random()
    if mode < 0.4:
        return pieces
    if mode < 0.6:
        return []
    return [piece for piece in pieces if rng.random() < 0.5]


def _load_base(path, min_size: int) -> Io:
    """The base image as memory pages: only the file's data regions are read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        io = Io.memory(max(size, min_size))
        pos = 0
        while pos < size:
            try:
                data_at = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break  # no data after pos
            hole_at = os.lseek(f.fileno(), data_at, os.SEEK_HOLE)
            while data_at < hole_at:
                n = min(LOAD_CHUNK, hole_at - data_at)
                chunk = os.pread(f.fileno(), n, data_at)
                if not chunk:
                    break
                if any(chunk):
                    io.poke(data_at, chunk)
                data_at += len(chunk)
            pos = hole_at
    return io


def _read_export(b: Btt, out: bytearray | None = None) -> bytearray:
    """The export as the engine reads it, into out (reused: no allocation per image)."""
    out = bytearray(b.size) if out is None else out
    view = memoryview(out)
    step = MAX_REQUEST - MAX_REQUEST % b.sector_size
    for off in range(0, b.size, step):
        b.pread(view[off:off + step], off)
    return out


def replay(log_path, base_path, **kw) -> Report:
    """Reads the log and replays it over the base image (see Replay for the options)."""
    return Replay(read_log(log_path), base_path, **kw).run()
