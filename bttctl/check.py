"""`bttctl check-namespace` and `bttctl read-infoblock`: offline inspection and repair.

Exit status of check-namespace (ndctl has no such contract; scripts need one):
  0 clean, 1 problems found and not repaired, or refused (EBUSY: the namespace or file is
  in use; stderr names the errno, as every bttctl refusal does), 2 problems found and all
  repaired, 3 no BTT found, 64 usage error, 74 I/O error.
Reports go to stdout (JSON with --json), progress and messages to stderr.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from btt_core import BttError, check_namespace, read_infoblock
from btt_core.errors import errno_name
from bttctl.exits import EXIT_IO, EXIT_REFUSED, EXIT_USAGE
from bttctl.namespace import default_control, hold, refused, where_args
from bttctl.progress import ProgressLine

EXIT_CLEAN, EXIT_PROBLEMS, EXIT_REPAIRED, EXIT_NO_BTT = 0, 1, 2, 3


def register(subparsers) -> None:
    """Adds the verbs to a `bttctl` argparse subparser collection."""
    p = subparsers.add_parser(
        "check-namespace", help="check (and repair) a sector namespace's BTT",
        description="Check a BTT's info blocks, log, map and free lists; with --repair, restore "
                    "damaged info blocks from their backups and redo interrupted writes. "
                    "Exit status: 0 clean, 1 problems left (or refused: EBUSY), 2 all "
                    "repaired, 3 no BTT, 64 usage error, 74 I/O error.")
    _target_args(p)
    p.add_argument("--repair", action="store_true", help="fix what can be fixed without data loss")
    p.add_argument("--rewrite-log", action="store_true",
                   help="with --repair: regenerate every lane's log in the current (0,1) scheme "
                        "(converts pre-4.15 images; crash-safe lane by lane)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--force", action="store_true",
                   help="with a served namespace: disable it for the check and enable it again "
                        "(refused while NBD clients are connected)")
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser(
        "read-infoblock", help="decode a BTT's info blocks",
        description="Print every arena's primary and backup info block with the validity of "
                    "signature, checksum and version, for both BTT positions (1.1 at +4 KiB, "
                    "2.0 at +0).")
    _target_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (the default is a summary)")
    p.set_defaults(func=cmd_read_infoblock)


def _target_args(p) -> None:
    p.add_argument("target", metavar="REGION_FILE|NAMESPACE",
                   help="a region file (the whole file is one namespace unless --offset/--size), "
                        "or a namespace: of a running server (--control) or of a region file "
                        "(--region FILE)")
    where_args(p, "TARGET is a namespace of this region file (offline)")
    p.add_argument("--offset", type=int, default=0, help="namespace start in the file (bytes)")
    p.add_argument("--size", type=int, default=None, help="namespace size (bytes; default: to EOF)")
    p.add_argument("--btt-version", choices=["1.1", "2.0"], default=None,
                   help="only look for this BTT version (default: 1.1, then 2.0)")


class _Progress(ProgressLine):
    """Per-arena percentages, for namespaces of 1 MiB or more."""

    def __init__(self, stream):
        super().__init__(stream)
        self.last = -1

    def __call__(self, arena, done, total):
        if not self.stream or total < 1 << 20:
            return
        pct = done * 100 // total
        if pct != self.last:
            self.last = pct
            self.show(f"checking arena {arena}: {pct:3d}%")


def _fail(e: OSError) -> int:
    print(f"bttctl: {e.strerror if e.strerror else e} ({errno_name(e.errno)})",
          file=sys.stderr)
    if e.errno == errno.ENODEV:
        return EXIT_NO_BTT
    if e.errno == errno.EBUSY:  # in use: refused, as every other bttctl verb says it
        return EXIT_REFUSED
    if e.errno == errno.EINVAL:
        return EXIT_USAGE
    return EXIT_IO


def _served(args, lock: bool = True):
    """TARGET names a namespace of a running server (or, with --region, of a region file):
    where it lives, and its state."""
    from bttctl.namespace import run
    return _pick(args, run(args, {"op": "list", "idle": True}, lock).get("result", []))


def _pick(args, listed: list[dict]) -> dict:
    """The namespace TARGET names (by dev or alt_name) in a `list` result."""
    for ns in listed:
        if args.target in (ns["dev"], ns.get("name")):
            return ns
    names = ", ".join(n["dev"] for n in listed) or "none"
    where = "the region files" if args.region_file else "the server"
    raise FileNotFoundError(errno.ENOENT, f"{where} have no namespace {args.target} (they "
                            f"have: {names})")


def _check_offline_namespace(args) -> int:
    """check-namespace NS --region FILE: the file's lock is held for the whole check."""
    from bttctl.namespace import offline
    from control.verbs import handle
    try:
        with offline(args.region_file) as registry:  # one lock and one read, for the whole check
            ns = _pick(args, handle(registry, {"op": "list", "idle": True}))
            args.target, args.offset, args.size = ns["path"], ns["offset"], ns["raw_size"]
            return _check_file(args, locked=True)
    except OSError as e:  # a served file is locked (EBUSY), or no such namespace
        return refused(e)


def _check_served(args) -> int:
    from bttctl.namespace import call
    try:
        ns = _served(args)
    except OSError as e:
        return refused(e)
    control = args.control or default_control()
    enabled = ns["state"] == "enabled"
    if enabled and not args.force:
        return refused(OSError(errno.EBUSY, f"{args.target} is enabled: disable it first "
                                f"(bttctl disable-namespace {args.target}) or use --force"))
    if enabled and ns.get("clients"):
        return refused(OSError(errno.EBUSY, f"{args.target} has {ns['clients']} connected "
                                "NBD client(s): disconnect them, or cut them off with "
                                "disable-namespace --force first"))
    if enabled:
        reply = call(control, {"op": "disable-namespace", "namespace": ns["dev"]})
        if not reply["ok"]:
            print(f"bttctl: cannot disable {args.target}: {reply['error']}", file=sys.stderr)
            return EXIT_IO
    args.target, args.offset, args.size = ns["path"], ns["offset"], ns["raw_size"]
    try:
        # The server holds the region's lock; the namespace is disabled, so nothing else
        # touches its bytes while we check.
        return _check_file(args, locked=True)
    finally:
        if enabled:
            reply = call(control, {"op": "enable-namespace", "namespace": ns["dev"]})
            if not reply["ok"]:
                print(f"bttctl: {ns['dev']} could not be enabled again: {reply['error']} "
                      f"({reply['errno']})", file=sys.stderr)


def _several_controls(args) -> bool:
    if len(getattr(args, "controls", [])) > 1:
        print("bttctl: give one --control: a namespace is checked through its own server",
              file=sys.stderr)
        return True
    return False


def cmd_check(args) -> int:
    if _several_controls(args):
        return EXIT_USAGE
    if args.rewrite_log and not args.repair:
        print("bttctl: --rewrite-log needs --repair (it rewrites the log)", file=sys.stderr)
        return EXIT_USAGE
    if args.region_file:
        return _check_offline_namespace(args)
    if args.control or _names_a_namespace(args.target):
        return _check_served(args)
    return _check_file(args)


def _names_a_namespace(target: str) -> bool:
    """A name that is no file: namespaceR.M, or an alt_name (a file name would have a dot
    or a slash, and a missing file is better reported as such)."""
    if os.path.exists(target):
        return False
    return target.startswith("namespace") or not ("." in target or os.sep in target)


def _check_file(args, locked: bool = False) -> int:
    if not os.path.exists(args.target):
        print(f"bttctl: {args.target}: no such file", file=sys.stderr)
        return EXIT_USAGE
    args.target = os.path.realpath(args.target)  # a --repair opens it refusing links
    lock = None
    if args.repair and not locked:
        # A repair must not race a server writing the same BTT (it holds this lock).
        from nvdimm.regionfile import lock_region
        try:
            lock = hold(lock_region(args.target))
        except OSError as e:  # BttError, NdError (EBUSY: a lease held elsewhere), EACCES
            return _fail(e)
    try:
        return _check_locked(args)
    finally:
        if lock is not None:
            lock.close()


def _check_locked(args) -> int:
    progress = _Progress(sys.stderr)
    try:
        report = check_namespace(args.target, offset=args.offset, size=args.size,
                                 version=args.btt_version, repair=args.repair,
                                 rewrite_log=args.rewrite_log, progress=progress)
    except BttError as e:
        progress.done()
        return _fail(e)
    progress.done()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print_check(report)
    return report["status"]


def _print_check(r) -> None:
    print(f"{r['path']}: BTT {r['version']}, {r['arenas']} arena(s), {r['nlba']} sectors of "
          f"{r['sector_size']} bytes")
    for f in r["findings"]:
        state = " [repaired]" if f["repaired"] else ""
        print(f"  {f['severity']}: arena {f['arena']}: {f['problem']}: {f['message']}{state}")
    pending = any(f["problem"] in ("interrupted-write", "journal") and not f["repaired"]
                  for f in r["findings"])
    replayed = r.get("journaled_writes", 0) if any(
        f["problem"] == "journal" and f["repaired"] for f in r["findings"]) else 0
    repaired = ", ".join(part for part in (
        f"{r['repaired']} problem(s) repaired" if r["repaired"] else "",
        f"{replayed} journaled write(s) replayed" if replayed else "") if part)
    verdict = {EXIT_CLEAN: "clean" + ("; the next open completes what a crash left (see the "
                                      "notes; --repair does it now)" if pending else ""),
               EXIT_PROBLEMS: f"{r['errors'] - r['repaired']} problem(s) left",
               EXIT_REPAIRED: repaired}[r["status"]]
    print(f"result: {verdict}")


def cmd_read_infoblock(args) -> int:
    if _several_controls(args):
        return EXIT_USAGE
    namespace_uuid = None  # a label-less namespace has none: only a null parent_uuid is valid
    if args.region_file or args.control or _names_a_namespace(args.target):
        try:  # reading is safe while the namespace is served
            ns = _served(args, lock=False)
        except OSError as e:
            print(f"bttctl: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
        args.target, args.offset, args.size = ns["path"], ns["offset"], ns["raw_size"]
        namespace_uuid = ns.get("raw_uuid")
    if not os.path.exists(args.target):
        print(f"bttctl: {args.target}: no such file", file=sys.stderr)
        return EXIT_USAGE
    try:
        found = read_infoblock(args.target, offset=args.offset, size=args.size,
                               namespace_uuid=namespace_uuid)
    except BttError as e:
        return _fail(e)
    if args.btt_version:
        found = [f for f in found if f["version"] == args.btt_version]
    if args.json:
        json.dump(found, sys.stdout, indent=2, default=lambda b: b.hex())
        print()
    else:
        for f in found:
            print(f"BTT {f['version']} at offset {f['offset']}:")
            for a in f["arenas"]:
                p = a["primary"]
                ok = "valid" if p["signature_ok"] and p["checksum_ok"] else "INVALID"
                if not p.get("parent_uuid_ok", True):
                    ok += f" (parent_uuid {p['parent_uuid']} does not match the namespace)"
                print(f"  arena {a['arena']} (+{a['start']}): primary {ok}, uuid {p['uuid']}, "
                      f"lbasize {p['external_lbasize']}, nlba {p['external_nlba']}, "
                      f"backup {'matches' if a['backup_matches'] else 'DIFFERS or missing'}")
    if not found:
        print("bttctl: no BTT info block found", file=sys.stderr)
        return EXIT_NO_BTT
    return 0


def main(argv=None) -> int:
    """Standalone entry (tests); `bttctl` registers the same verbs."""
    parser = argparse.ArgumentParser(prog="bttctl")
    sub = parser.add_subparsers(dest="verb", required=True)
    register(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
