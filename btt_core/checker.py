"""Offline checking and inspection of a BTT that may be too damaged to open.

check_namespace() runs the C checker (btt_check_offline) and returns a JSON-ready report;
read_infoblock() decodes every arena's info blocks with their validity. Both treat the
media as untrusted: they report what is wrong and never index past what they read.
"""
from __future__ import annotations

import errno as _errno
import os
import uuid

from ._lib import ffi, lib
from .engine import Btt, BttError, Io, _check, _journal_path, unpack_info

STATUS_CLEAN, STATUS_PROBLEMS, STATUS_REPAIRED = 0, 1, 2
_VERSIONS = {None: 0, "1.1": 11, "2.0": 20}


@ffi.def_extern()
def _check_progress(ctx, arena, done, total):
    callback = ffi.from_handle(ctx)
    callback(arena, done, total)


def check_namespace(path, *, offset=0, size=None, version=None, repair=False, rewrite_log=False,
                    progress=None) -> dict:
    """Checks (and with repair=True, repairs) the BTT in [offset, offset+size) of path.

    status: 0 clean, 1 problems left unrepaired, 2 every problem repaired. What the next
    open recovers by design (interrupted writes, a kill -9's intent journal) is a note, not
    a problem; --repair does it now."""
    if rewrite_log and not repair:
        raise BttError(_errno.EINVAL, "--rewrite-log needs --repair")
    at_open = _recovery(path, offset, size, version, repair)
    io = Io.file(path, readonly=not repair)
    try:
        report = check_io(io, offset=offset, size=size, version=version, repair=repair,
                          rewrite_log=rewrite_log, progress=progress)
    finally:
        io.close()
    report["path"] = os.path.abspath(path)
    if at_open:
        journaled = at_open["journal_replayed"]
        report["journaled_writes"] = journaled
        report["findings"].append({
            "severity": "note", "arena": 0, "problem": "journal", "repaired": repair,
            "message": f"{journaled} write(s) acknowledged before a crash are in the intent "
                       f"journal ({_journal_path(path, offset)}): " +
                       ("replayed and committed" if repair else "the next open replays them")})
        if repair and report["status"] == STATUS_CLEAN:
            report["status"] = STATUS_REPAIRED
    return report


def _recovery(path, offset, size, version, repair) -> dict | None:
    """What the engine's own recovery does at the next open, beyond what the checker sees:
    replaying the intent journal that group durability leaves beside the region after a
    kill -9 (same boot only). Seen through a read-only open, which changes nothing; with
    `repair`, done by a read-write open, which also commits it. None if there is nothing
    to replay or the BTT does not open (the check then says why)."""
    if not os.path.lexists(_journal_path(path, offset)):
        return None
    try:
        with Btt.open(path, offset=offset, size=size, version=version, readonly=True) as b:
            stats = b.stats()
        if not stats["journal_replayed"]:
            return None
        if repair:
            with Btt.open(path, offset=offset, size=size, version=version) as b:
                stats = b.stats()
    except BttError:
        return None
    return stats


def check_io(io: Io, *, offset=0, size=None, version=None, repair=False, rewrite_log=False,
             progress=None) -> dict:
    """check_namespace() over any backing store (memory images in the crash tests)."""
    if version not in _VERSIONS:
        raise BttError(_errno.EINVAL, "version must be 1.1 or 2.0")
    o = ffi.new("struct btt_check_opts *")
    o.ns_offset = offset
    o.ns_size = io.size - offset if size is None else size
    o.version = _VERSIONS[version]
    o.repair = int(repair)
    o.rewrite_log = int(rewrite_log)
    handle = ffi.new_handle(progress) if progress else None
    if handle is not None:
        o.progress = lib._check_progress
        o.ctx = handle
    summary = ffi.new("struct btt_check_summary *")
    report = ffi.new("char[]", 1 << 16)
    _check(lib.btt_check_offline(io._ptr, o, summary, report, 1 << 16))
    findings = []
    for line in ffi.string(report).decode(errors="replace").splitlines():
        severity, arena, code, repaired, text = line.split("\t", 4)
        if code == "interrupted-write" and repaired != "1":
            # The log holds the write and the map not yet: the next open completes it, as
            # Linux's does (btt-format.md section 6.5). A crash leaves these; no problem.
            severity, text = "note", text + "; the next open completes it (--repair: now)"
        findings.append({"severity": severity, "arena": int(arena), "problem": code,
                         "repaired": repaired == "1", "message": text})
    noted = sum(f["problem"] == "interrupted-write" and f["severity"] == "note"
                for f in findings)
    errors = [f for f in findings if f["severity"] == "error"]
    if not errors:
        status = STATUS_CLEAN
    elif all(f["repaired"] for f in errors):
        status = STATUS_REPAIRED
    else:
        status = STATUS_PROBLEMS
    return {"offset": offset, "version": f"{summary.version // 10}.{summary.version % 10}",
            "arenas": summary.narenas, "sector_size": summary.lbasize, "nlba": summary.nlba,
            "errors": summary.errors - noted, "repaired": summary.repaired, "status": status,
            "findings": findings}


def read_infoblock(path, *, offset=0, size=None, namespace_uuid=None) -> list[dict]:
    """Every arena's primary and backup info block, decoded, with their validity, for
    both possible BTT positions (1.1 at +4 KiB, 2.0 at +0). Stops where the chain breaks.

    parent_uuid_ok: Linux accepts a null parent_uuid, or one equal to the namespace's uuid;
    a label-less namespace has none, so only null is valid for it."""
    io = Io.file(path, readonly=True)
    try:
        return read_infoblock_io(io, offset=offset, size=size, namespace_uuid=namespace_uuid)
    finally:
        io.close()


def read_infoblock_io(io: Io, *, offset=0, size=None, namespace_uuid=None) -> list[dict]:
    """read_infoblock() over a backing store the caller keeps owning."""
    end = io.size if size is None else offset + size
    found = []
    for version, initial in (("1.1", 4096), ("2.0", 0)):
        arenas = _walk(io, offset + initial, end, version)
        for a in arenas:
            for block in (a["primary"], a["backup"]):
                if block:
                    block["parent_uuid_ok"] = block["parent_uuid"] in (
                        str(uuid.UUID(int=0)), str(namespace_uuid) if namespace_uuid else None)
        if arenas:
            found.append({"version": version, "offset": offset + initial, "arenas": arenas})
    return found


def _decode(io, where, end):
    if where + 4096 > end:
        return None
    d = unpack_info(io.read(where, 4096))
    d["signature_ok"] = d.pop("signature") == b"BTT_ARENA_INFO\0\0"
    d["offset"] = where
    return d


def _same(primary: dict, backup: dict) -> bool:
    """The two copies agree on every field (their locations aside)."""
    skip = ("offset", "version_ok", "parent_uuid_ok")
    return ({k: v for k, v in primary.items() if k not in skip} ==
            {k: v for k, v in backup.items() if k not in skip})


def _walk(io, base, end, version):
    arenas: list[dict] = []
    start = 0
    while base + start + 4096 <= end and len(arenas) < 1 << 16:
        primary = _decode(io, base + start, end)
        if not primary["signature_ok"] and not arenas:
            return []  # nothing here that looks like a BTT of this version
        major, minor = (int(x) for x in version.split("."))
        found = (primary["version_major"], primary["version_minor"])
        primary["version_ok"] = found == (major, minor)
        backup = None
        if primary["signature_ok"] and 4096 <= primary["info2off"] < end - base - start:
            backup = _decode(io, base + start + primary["info2off"], end)
        arenas.append({"arena": len(arenas), "start": start, "primary": primary, "backup": backup,
                       "backup_matches": backup is not None and _same(primary, backup)})
        if not (primary["signature_ok"] and primary["checksum_ok"]) or not primary["nextoff"]:
            break
        start += primary["nextoff"]
    return arenas
