"""`bttctl serve`: run nbdkit with our plugin and tell the user how to attach.

With no arguments it serves ./var/region0.img, creating it first: a sparse, labelled 1 GiB
region with one 512 MiB sector-mode namespace, "demo", with 4096-byte sectors. The export
URI goes to stdout; the ready-to-paste client commands and messages to stderr. Ctrl-C
stops nbdkit cleanly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from control.sockets import clear_socket_path, socket_ident, unlink_if_same
from plugin.pythread import DEFAULT_THREAD_MODEL, DEFAULT_WORKERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "plugin", "nbdkit_btt.py")
DEFAULT_REGION = os.path.join("var", "region0.img")
DEFAULT_SIZE = 1 << 30
STOP_WAIT = 10.0  # seconds Ctrl-C waits for connected clients before killing nbdkit


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve region files over NBD",
                              description="Start nbdkit with the BTT plugin. Without "
                              "arguments, serve var/region0.img (created if missing).")
    p.add_argument("--region", action="append", help="region file (repeatable); default "
                   f"{DEFAULT_REGION}, created with a 512 MiB sector namespace if missing")
    p.add_argument("--socket", help="Unix socket path (default: var/nbd.sock)")
    p.add_argument("--tcp", metavar="[HOST:]PORT", nargs="?", const="10809",
                   help="listen on TCP instead (host defaults to localhost, port to 10809)")
    p.add_argument("--durability", choices=["group", "strict", "none"], default="group",
                   help="group (default): epoch commits plus an intent journal beside the "
                   "region, so kill -9 loses no acknowledged write; strict: every "
                   "acknowledged write is durable, as the kernel does; none: never sync "
                   "(tmpfs, benchmarks). See docs/engine.md")
    p.add_argument("--zero-flag", choices=["on", "off"], default="off",
                   help="serve TRIM and fast zeroing through the BTT map's Z flag (see docs)")
    p.add_argument("--threadmodel", choices=["serialize_all", "serialize_requests", "parallel"],
                   default=DEFAULT_THREAD_MODEL,
                   help=f"nbdkit thread model (default {DEFAULT_THREAD_MODEL}: every "
                   "connection and namespace is served at once, so one tenant's flushes "
                   "never stall another; parallel also overlaps one connection's requests, "
                   "but a client that drops its connection mid-request aborts nbdkit 1.32). "
                   "See docs/serving.md")
    p.add_argument("--threads", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"worker threads per connection under --threadmodel parallel "
                   f"(default {DEFAULT_WORKERS}: measured best on 2 cores)")
    p.add_argument("--readonly", action="store_true",
                   help="export read-only (nbdkit -r): nothing is written to the region files")
    p.add_argument("--control", help="control socket path (default: beside the NBD socket; "
                   "with --tcp, nbd-PORT.ctl beside the first region)")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="NBD connections served at once; more are refused (default 256, "
                   "fewer if the file descriptor limit is low)")
    p.add_argument("--log-writes", metavar="PATH",
                   help="record every write, sync and flush reply to this new file, for "
                        "`bttctl replay-log` (docs/write-log.md); copy the region file first")
    p.add_argument("--verbose", action="store_true", help="nbdkit -v")
    p.set_defaults(func=cmd_serve)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _default_region(path: str) -> None:
    """The demo: a labelled 1 GiB region (a QEMU NVDIMM backend as it stands) holding one
    512 MiB sector namespace named "demo"; the other half is free for create-namespace."""
    if os.path.exists(path):
        return
    from bttctl.namespace import call_offline
    from nvdimm.labels import LabelArea
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _say(f"creating {path}: a 1 GiB labelled region with one 512 MiB sector namespace "
         "(\"demo\", 4096-byte sectors)")
    LabelArea.create(path, DEFAULT_SIZE).close()
    reply = call_offline([path], {"op": "create-namespace", "mode": "sector", "size": "512M",
                                  "name": "demo"})
    if not reply["ok"]:
        raise SystemExit(f"bttctl serve: creating the demo namespace: {reply['error']}")


def _exports(reply: dict) -> list[dict]:
    """The served namespaces in a `list --regions --idle` reply, each with its region."""
    return [dict(ns, labels=r["labels"]) for r in reply.get("result", [])
            for ns in r["namespaces"] if ns.get("export")]


def _clients(control: str) -> int | None:
    from control.server import request
    try:
        return sum(ns.get("clients", 0) for ns in request(control, {"op": "list"}, 2)["result"])
    except (OSError, ValueError, KeyError):
        return None


def _listen_args(args, var: str):
    """(nbdkit options, URI text, address, default control path); SystemExit(64) when the
    address is malformed."""
    if args.tcp is not None:
        host, _, port = args.tcp.rpartition(":")
        host = host or "localhost"
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            _say(f"bttctl serve: --tcp {args.tcp}: the port must be a number from 1 to 65535")
            raise SystemExit(64)
        # One control socket per port: two TCP servers with regions in one directory must
        # not fight over one path (bttctl finds it, see bttctl/namespace.py default_control).
        return (["--ipaddr", host, "--port", port], f"nbd://{host}:{port}", (host, int(port)),
                os.path.join(var, f"nbd-{int(port)}.ctl"))
    sock = os.path.abspath(args.socket or os.path.join(var, "nbd.sock"))
    return ["--unix", sock], sock, sock, os.path.splitext(sock)[0] + ".ctl"


def _ready(control: str, proc, timeout=30.0) -> dict | None:
    """The server's first `list` reply once it answers, or None if nbdkit exited (a busy
    port, a refused region) or did not come up in time. The plugin starts the control
    socket after nbdkit has bound its listening sockets, so an answer means nbdkit is
    serving; a TCP connect could instead reach whoever else holds the port."""
    from control.server import request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return request(control, {"op": "list", "regions": True, "idle": True}, 2)
        except (OSError, ValueError):
            time.sleep(0.05)
    return None


def _check_locks(regions) -> str | None:
    """Why a region cannot be served (another server holds its lock), or None: said here
    in one line, before nbdkit starts."""
    from nvdimm.regionfile import lock_region
    for r in regions:
        try:
            os.close(lock_region(r))
        except OSError as e:
            return e.strerror or str(e)
    return None


def cmd_serve(args) -> int:
    regions = [os.path.realpath(r) for r in (args.region or [DEFAULT_REGION])]
    if not args.region:
        _default_region(regions[0])
    for r in regions:
        if not os.path.isfile(r):
            _say(f"bttctl serve: {r}: no such file")
            return 64
    if args.max_connections is not None and args.max_connections < 1:
        _say("bttctl serve: --max-connections must be 1 or more")
        return 64
    if not 1 <= args.threads <= 256:
        _say("bttctl serve: --threads must be 1..256")
        return 64
    var = os.path.dirname(regions[0])
    listen, where_text, where, default_control = _listen_args(args, var)
    control = os.path.abspath(args.control or default_control)
    # Only a stale socket may be replaced: `--socket r.img` or `--control notes.txt`
    # must not delete the file that is there (control/sockets.py).
    try:
        if isinstance(where, str):
            clear_socket_path(where, "NBD socket")
        clear_socket_path(control, "control socket")
    except OSError as e:
        _say(f"bttctl serve: {e.strerror}")
        return 1
    if args.log_writes and os.path.lexists(args.log_writes):
        # The plugin refuses it too (O_EXCL): this says it in one line before nbdkit starts.
        _say(f"bttctl serve: write log {args.log_writes} already exists; refusing to "
             "overwrite it (name a new file)")
        return 1
    locked = _check_locks(regions)
    if locked:
        _say(f"bttctl serve: {locked}")
        return 1
    threads = ["--threads", str(args.threads)] if args.threadmodel == "parallel" else []
    argv = ["nbdkit", "--foreground", *listen, *threads, *(["-r"] if args.readonly else []),
            *(["-v"] if args.verbose else []), "python", ENTRY,
            *[f"region={r}" for r in regions], f"durability={args.durability}",
            f"zero-flag={args.zero_flag}", f"threadmodel={args.threadmodel}",
            f"control={control}", *(["readonly=on"] if args.readonly else []),
            *([f"max-connections={args.max_connections}"] if args.max_connections else []),
            *([f"log-writes={os.path.abspath(args.log_writes)}"] if args.log_writes else [])]
    env = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
    proc = subprocess.Popen(argv, env=env)
    stop = {"signals": 0, "at": 0.0}

    def on_signal(signum, frame):
        stop["signals"] += 1
        if stop["signals"] == 1:
            stop["at"] = time.monotonic()
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    reply = _ready(control, proc)
    if reply is None:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        _say(f"bttctl serve: nbdkit did not start (exit {rc}); see its message above")
        return 1
    # What nbdkit does not remove itself, or only on a clean exit: removed when we stop,
    # if the paths still name the sockets this server bound.
    owned = [(p, socket_ident(p)) for p in ([where] if isinstance(where, str) else []) + [control]]
    try:
        if stop["signals"] == 0:
            _banner(args, regions, where, control, reply.get("result", []))
        return _wait(proc, stop, control)
    finally:
        for path, ident in owned:
            unlink_if_same(path, ident)


def _attach(where, export: str, sector_size: int):
    """(URI, nbd-client command, QEMU options) for one export. nbd-client needs the
    export's block size (-b): its default of 512 makes the kernel send requests a
    4096-byte export refuses, and mkfs fails."""
    if isinstance(where, str):
        return (f"nbd+unix:///{export}?socket={where}",
                f"nbd-client -unix {where} /dev/nbd0 -N {export} -b {sector_size}",
                f"-blockdev driver=nbd,server.type=unix,server.path={where},export={export},"
                f"node-name=disk0 -device virtio-blk-pci,drive=disk0")
    host, port = where
    return (f"nbd://{host}:{port}/{export}",
            f"nbd-client {host} {port} /dev/nbd0 -N {export} -b {sector_size}",
            f"-blockdev driver=nbd,server.type=inet,server.host={host},server.port={port},"
            f"export={export},node-name=disk0 -device virtio-blk-pci,drive=disk0")


def _export_lines(regions: list[dict]) -> list[str]:
    """One line per namespace: the names it is exported under, or why it is not."""
    lines = []
    for region in regions:
        for ns in region["namespaces"]:
            names = " or ".join(n for n in (ns.get("name"), ns["dev"]) if n)
            if not ns.get("export"):
                lines.append(f"  {names}: disabled (bttctl enable-namespace {ns['dev']})")
                continue
            lines.append(f"  {names}: {ns['mode']}, {ns['sector_size']}-byte sectors, "
                         f"{ns['size'] >> 20} MiB")
            if ns["mode"] == "raw" and region["labels"] == "none":
                lines.append(f"    warning: {region['path']} has no labels and no BTT: "
                             "served raw, every byte as it is, read-write unless --readonly")
    return lines


def _create_hint(args, control: str, regions: list[dict]) -> str:
    """What to run when there is nothing to export: a command that will work here."""
    if args.readonly:
        return "nothing can be created: the server is read-only (--readonly)"
    room = max((r["max_available_extent"] for r in regions
                if r["labels"] != "none" and not r["read_only"]), default=0)
    if room < 32 << 20:
        return ("no region has room for a namespace: serve another region, or make one with "
                "bttctl create-region FILE -s SIZE")
    size = " --size 256M" if room >= 256 << 20 else ""  # else: the largest free extent
    return (f"create one with\n  bttctl create-namespace --control {control} --mode sector"
            f"{size} --name db")


def _banner(args, regions, where, control, listed: list[dict]) -> None:
    exports = _exports({"result": listed})
    place = where if isinstance(where, str) else f"{where[0]}:{where[1]}"
    head = (f"\nserving {', '.join(regions)} ({args.durability} durability"
            f"{', read-only' if args.readonly else ''}) at {place}\ncontrol socket: {control}")
    if not exports:
        _, nbd_client, _ = _attach(where, "db", 4096)
        _say(f"{head}\n\nno namespaces yet: {_create_hint(args, control, listed)}\n"
             f"then attach it by its name:\n  {nbd_client}\n\nCtrl-C stops the server.")
        return
    first = exports[0]
    export = first.get("name") or first["dev"]  # the alt_name outlives a renumbering
    uri, nbd_client, qemu = _attach(where, export, first["sector_size"])
    print(uri, flush=True)
    lines = "\n".join(_export_lines(listed))
    _say(f"""{head}

exports (by alt_name or device name):
{lines}

  nbdinfo '{uri}'
  {nbd_client}
  qemu-system-x86_64 ... {qemu}
  fio --name=t --ioengine=nbd --uri='{uri}' --rw=randrw --bs={first['sector_size']} \\
      --size={min(256, first['size'] >> 20)}M

Ctrl-C stops the server.""")


def _wait(proc, stop, control) -> int:
    """Runs until nbdkit exits. After Ctrl-C or SIGTERM nbdkit waits for connected clients;
    say so, and after STOP_WAIT seconds (or a second Ctrl-C) kill it: the intent journal
    keeps every acknowledged write across the SIGKILL."""
    announced = False
    while True:
        try:
            rc = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if not stop["signals"]:
            continue
        waited = time.monotonic() - stop["at"]
        if not announced and waited > 0.5:
            announced = True
            n = _clients(control)
            who = f"{n} client(s)" if n else "clients"
            _say(f"bttctl serve: stopping; waiting up to {STOP_WAIT:g} s for {who} to "
                 "disconnect (Ctrl-C again stops now)...")
        if waited > STOP_WAIT or stop["signals"] > 1:
            _say("bttctl serve: clients still connected; killing nbdkit (the intent journal "
                 "keeps every acknowledged write)")
            proc.kill()
            rc = proc.wait()
            break
    if stop["signals"]:
        _say("bttctl serve: stopped")
        return 0
    return rc
