"""`bttctl list | create-namespace | destroy-namespace | enable-namespace | disable-namespace |
get | set | create-region`: ndctl's namespace verbs.

Every verb except create-region runs against a running server (`--control PATH`, printed
by `bttctl serve`; default: see default_control; repeated, one view over several servers:
bttctl/cluster.py) or offline on a region file (`--region FILE`). Both
go through the same code (control/verbs.py); offline, the region file's lock is held for the
command, so it cannot race a server. JSON on stdout, messages on stderr naming the errno.
Exit status: 0 success, 1 refused (the errno says why), 64 usage error or no server.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys

from btt_core.errors import errno_name
from bttctl.exits import EXIT_REFUSED, EXIT_USAGE
from control.server import error_reply, error_text, request
from control.sockets import socket_ident
from control.verbs import WIRE_SECTOR_SIZES

DEFAULT_CONTROL = os.path.join("var", "nbd.ctl")


def register(subparsers) -> None:
    p = _verb(subparsers, "list", "list namespaces (or regions) as JSON",
              "Like `ndctl list`: enabled namespaces by default.")
    p.add_argument("-i", "--idle", action="store_true", help="include disabled namespaces")
    p.add_argument("-R", "--regions", action="store_true",
                   help="list regions, each with its namespaces")
    p.add_argument("--stats", action="store_true",
                   help="with each served sector namespace, its durability mode and the "
                        "engine's counters (sectors written, commits, fdatasyncs)")
    p.set_defaults(request=lambda a: {"op": "list", "idle": a.idle, "regions": a.regions,
                                      "stats": a.stats, "at_start": bool(a.region_file)})

    p = _verb(subparsers, "create-namespace", "create (or with -e, reconfigure) a namespace",
              "Carve a namespace from a labelled region's free space and enable it. In "
              "sector mode a BTT claims it (every sector write atomic). With -e, replace an "
              "existing namespace: its contents are NOT kept (its info blocks are erased and "
              "a new BTT starts empty; the old bytes are not scrubbed).")
    p.add_argument("-m", "--mode", choices=["sector", "safe", "raw"], default=None,
                   help="sector (default; alias safe) or raw")
    p.add_argument("-l", "--sector-size", type=int, default=None, choices=WIRE_SECTOR_SIZES,
                   help="sector size in bytes (default 4096)")
    p.add_argument("-s", "--size", default=None,
                   help="bytes, or with K/M/G/T (default: the largest free extent)")
    p.add_argument("-n", "--name", default=None, help="a friendly name (alt_name), also an "
                   "export name")
    p.add_argument("-u", "--uuid", default=None, help="the namespace uuid (default: random)")
    p.add_argument("-r", "--region-id", dest="region_id", default=None, metavar="REGION",
                   help="region0, region1, ... (default: the first with room)")
    p.add_argument("-e", "--reconfig", metavar="NAMESPACE", default=None,
                   help="reconfigure this namespace (destroys its data)")
    p.add_argument("-f", "--force", action="store_true",
                   help="with -e: even if enabled or clients are connected")
    p.set_defaults(request=_create_request)

    p = _verb(subparsers, "destroy-namespace", "destroy a namespace (its data is lost)",
              "Zero the namespace's info blocks and, in a labelled region, delete its label "
              "and free its capacity. An enabled namespace needs --force.")
    p.add_argument("namespace", help="namespaceR.M, its name, or a btt holding it")
    p.add_argument("-f", "--force", action="store_true",
                   help="even if enabled or clients are connected (their requests then fail)")
    p.set_defaults(request=lambda a: {"op": "destroy-namespace", "namespace": a.namespace,
                                      "force": a.force})

    for verb, text, desc in (
            ("enable-namespace", "enable (export) a namespace",
             "Autodetect a BTT (unless force_raw) and export the namespace in sector or raw "
             "mode. Naming a configured btt binds that btt instead."),
            ("disable-namespace", "disable (unexport) a namespace",
             "Remove the export. Refused (EBUSY) while NBD clients are connected, unless "
             "--force.")):
        p = _verb(subparsers, verb, text, desc)
        p.add_argument("namespace", help="namespaceR.M, its name, or a btt holding it")
        if verb == "disable-namespace":
            p.add_argument("-f", "--force", action="store_true",
                           help="even with clients connected (their requests then fail)")
        p.set_defaults(request=lambda a, verb=verb: {
            "op": verb, "namespace": a.namespace, "force": getattr(a, "force", False)})

    p = _verb(subparsers, "get", "read an attribute, like reading sysfs",
              "Print DEVICE/ATTRIBUTE's value, e.g. `bttctl get namespace0.0/sector_size`.")
    p.add_argument("path", metavar="DEVICE/ATTRIBUTE")
    p.set_defaults(request=lambda a: {"op": "get", "path": a.path})

    p = _verb(subparsers, "set", "write an attribute, like writing to sysfs",
              "Write VALUE to DEVICE/ATTRIBUTE with the kernel's rules and errno values, e.g. "
              "`bttctl set namespace0.0/alt_name db`.")
    p.add_argument("path", metavar="DEVICE/ATTRIBUTE")
    p.add_argument("value")
    p.add_argument("-f", "--force", action="store_true",
                   help="region read_only: even with clients connected")
    p.set_defaults(request=lambda a: {"op": "set", "path": a.path, "value": a.value,
                                      "force": a.force})

    p = subparsers.add_parser(
        "create-region", help="make a new labelled region file",
        description="Create a sparse region file with a Linux/UEFI label area at its end, "
                    "laid out like a QEMU NVDIMM backend (give QEMU size=FILE SIZE and "
                    "label-size=LABEL_SIZE).")
    p.add_argument("file")
    p.add_argument("-s", "--size", required=True,
                   help="the region (pmem) size: bytes or K/M/G/T; the label area comes on top")
    p.add_argument("--label-size", default="128K", help="label area size (default 128K)")
    p.add_argument("--label-version", choices=["1.1", "1.2"], default="1.2",
                   help="1.2 (default: claim classes recorded, BTT 2.0) or 1.1 (BTT 1.1)")
    p.set_defaults(func=cmd_create_region)


def _verb(subparsers, name: str, helptext: str, description: str):
    p = subparsers.add_parser(name, help=helptext, description=description)
    where_args(p, "work offline on this region file (repeatable)")
    p.set_defaults(func=_run)
    return p


def where_args(p, region_help: str) -> None:
    """--control SOCK or --region FILE: where a verb finds its namespaces (`run` reads them)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--control", default=None, action="append",
                       help=f"a running server's control socket (default: {DEFAULT_CONTROL}, "
                       "or the only var/nbd-PORT.ctl of a TCP server); repeat it for one view "
                       "over several servers, e.g. other hosts' sockets forwarded with ssh -L "
                       "(docs/scale-out.md)")
    where.add_argument("--region", dest="region_file", metavar="FILE", action="append",
                       default=None, help=region_help)


def _create_request(a) -> dict:
    req = {"op": "create-namespace", "force": a.force}
    for key, value in (("mode", a.mode), ("sector_size", a.sector_size), ("size", a.size),
                       ("name", a.name), ("uuid", a.uuid), ("region", a.region_id),
                       ("reconfig", a.reconfig)):
        if value is not None:
            req[key] = value
    if a.reconfig is None and a.mode is None:
        req["mode"] = "sector"
    return req


@contextlib.contextmanager
def offline(paths, lock: bool = True):
    """A Registry over region files with nothing served, holding their locks (without
    `lock`, for reading only: a served file may then be read, never changed)."""
    from nvdimm.regionfile import lock_region
    from plugin.exports import Registry
    locks = []
    try:
        registry = Registry(serving=False)
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(errno.ENOENT, f"{path}: no such region file")
            path = os.path.realpath(path)  # as the server does: later opens refuse links
            if lock:
                locks.append(hold(lock_region(path)))
            registry.add_region(path)
        yield registry
    finally:
        for held in locks:
            held.close()


def hold(lock):
    """An offline verb's region lock, with its lease (if any) renewed while the verb runs:
    a long repair must not look abandoned to another host. If the lease is lost, stop at
    once, as a server does: every write of the verbs is crash-safe."""
    from nvdimm.lease import stop_at_once
    if lock.lease is not None:
        def lost(e: OSError) -> None:
            stop_at_once(f"bttctl: {errno_name(e.errno)}: {e.strerror or e}; stopping at once",
                         lambda: os._exit(EXIT_REFUSED))
        lock.lease.start_heartbeat(lost)
    return lock


def default_control() -> str:
    """The control socket of `bttctl serve` run in this directory: var/nbd.ctl (a Unix
    socket server's), else the one var/nbd-PORT.ctl (a TCP server's, one per port) if
    there is exactly one. With several TCP servers, --control must choose."""
    if os.path.lexists(DEFAULT_CONTROL):
        return DEFAULT_CONTROL
    var = os.path.dirname(DEFAULT_CONTROL)
    try:
        found = sorted(os.path.join(var, f) for f in os.listdir(var)
                       if re.fullmatch(r"nbd-\d+\.ctl", f) and socket_ident(os.path.join(var, f)))
    except OSError:
        found = []
    if len(found) > 1:
        raise OSError(errno.EINVAL, f"several servers' control sockets: {', '.join(found)}; "
                      "choose one with --control")
    return found[0] if found else DEFAULT_CONTROL


def call(control: str | None, req: dict) -> dict:
    """One request to a server (control None: default_control()); raises OSError when it
    cannot be reached."""
    control = control or default_control()
    if not os.path.exists(control):
        raise FileNotFoundError(errno.ENOENT, f"no control socket at {control}: is `bttctl "
                                "serve` running? (or work offline with --region FILE)")
    try:
        return request(control, req)
    except ConnectionRefusedError:
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"no server is running on {control} "
                                     "(a stale socket left by a killed server?); start one "
                                     "with `bttctl serve`, or work offline with --region "
                                     "FILE") from None


def call_offline(paths, req: dict, lock: bool = True) -> dict:
    """The same reply a server would give, computed on region files."""
    from control.verbs import handle
    with offline(paths, lock) as registry:
        try:
            return {"ok": True, "result": handle(registry, req)}
        except OSError as e:
            return error_reply(req.get("id"), e.errno or errno.EIO, e.strerror or str(e))


def run(args, req: dict, lock: bool = True) -> dict:
    """The reply to `req` from wherever args point (--region files or --control)."""
    if getattr(args, "region_file", None):
        return call_offline(args.region_file, req, lock)
    return call(args.control, req)


def refused(e: OSError) -> int:
    """A server, file or namespace that cannot be had, in one line naming the errno; the
    exit status: EBUSY (in use) is a refusal, the rest (no server, no such namespace or
    file) usage errors."""
    print(f"bttctl: {error_text(errno_name(e.errno), e.strerror or str(e))}",
          file=sys.stderr)
    return EXIT_REFUSED if e.errno == errno.EBUSY else EXIT_USAGE


OFFLINE_REFUSED = ("enable-namespace", "disable-namespace")


def one_control(args) -> None:
    """--control is repeatable (bttctl/cluster.py); the verbs that talk to one server find
    it in args.control, the whole list in args.controls."""
    given = getattr(args, "control", None)
    if isinstance(given, list):
        args.controls, args.control = given, given[0] if len(given) == 1 else None
    else:
        args.controls = [given] if given else []


def _run(args) -> int:
    from bttctl import cluster
    req = args.request(args)
    if not getattr(args, "region_file", None) and (len(args.controls) > 1 or
                                                   cluster.names_uuid(req)):
        try:
            return cluster.run(args.controls or [default_control()], req)
        except OSError as e:
            return refused(e)
    if getattr(args, "region_file", None) and req["op"] in OFFLINE_REFUSED:
        # Offline nothing is served, and enabled is not kept on media (Linux keeps no such
        # flag in the labels either): a server enables every namespace it can at start.
        # Answering 0 here changed nothing, so it is refused.
        print(f"bttctl {req['op']}: EOPNOTSUPP: offline (--region) nothing is served, so "
              "there is nothing to enable or disable; a server enables every namespace "
              "its labels describe when it starts (`bttctl list --region FILE` shows what "
              "it would do). Use a running server's --control", file=sys.stderr)
        return EXIT_REFUSED
    try:
        reply = run(args, req)
    except OSError as e:  # no server, no such file, or the region file is locked
        return refused(e)
    return show_reply(f"bttctl {req['op']}", reply)


def show_reply(who: str, reply: dict) -> int:
    """A control reply as the CLI prints it: the result on stdout (JSON unless a bare
    string), or the refusal as one line on stderr."""
    if not reply.get("ok"):
        print(f"{who}: {error_text(reply.get('errno', ''), reply.get('error', ''))}",
              file=sys.stderr)
        return EXIT_REFUSED
    result = reply["result"]
    if isinstance(result, str):
        print(result)
    else:
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0


def cmd_create_region(args) -> int:
    from control.verbs import parse_size
    from nvdimm.labels import LabelArea
    try:
        size, label_size = parse_size(args.size), parse_size(args.label_size)
        LabelArea.create(args.file, size, label_size=label_size,
                         version=args.label_version).close()
    except OSError as e:
        print(f"bttctl create-region: "
              f"{error_text(errno_name(e.errno), e.strerror or str(e))}",
              file=sys.stderr)
        return EXIT_REFUSED
    result = {"file": os.path.abspath(args.file), "size": size, "label_size": label_size,
              "file_size": size + label_size, "labels": args.label_version,
              "qemu": f"-object memory-backend-file,id=nv0,share=on,mem-path="
                      f"{os.path.abspath(args.file)},size={size + label_size} -device "
                      f"nvdimm,memdev=nv0,label-size={label_size},slot=0"}
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0
