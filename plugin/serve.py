"""`bttctl serve`: run nbdkit with our plugin and tell the user how to attach.

With no arguments it serves ./var/region0.img, creating it first: a sparse, labelled 1 GiB
region with one 512 MiB sector-mode namespace, "demo", with 4096-byte sectors. The export
URI goes to stdout; the ready-to-paste client commands and messages to stderr. Ctrl-C
stops nbdkit cleanly.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from plugin.paths import clear_socket_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "plugin", "nbdkit_btt.py")
DEFAULT_REGION = os.path.join("var", "region0.img")
DEFAULT_SIZE = 1 << 30


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve region files over NBD",
                              description="Start nbdkit with the BTT plugin. Without "
                              "arguments, serve var/region0.img (created if missing).")
    p.add_argument("--region", action="append", help="region file (repeatable); default "
                   f"{DEFAULT_REGION}, created with a 512 MiB sector namespace if missing")
    p.add_argument("--socket", help="Unix socket path (default: var/nbd.sock)")
    p.add_argument("--tcp", metavar="[HOST:]PORT", nargs="?", const="10809",
                   help="listen on TCP instead (host defaults to localhost, port to 10809)")
    p.add_argument("--durability", choices=["group", "strict", "none"], default="group")
    p.add_argument("--zero-flag", choices=["on", "off"], default="off",
                   help="serve TRIM and fast zeroing through the BTT map's Z flag (see docs)")
    p.add_argument("--threadmodel", choices=["serialize_all", "serialize_requests", "parallel"],
                   default="serialize_all")
    p.add_argument("--readonly", action="store_true", help="export read-only (nbdkit -r): nothing is written to the region files")
    p.add_argument("--control", help="control socket path (default: beside the NBD socket)")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="NBD connections served at once; more are refused (default 256, "
                   "fewer if the file descriptor limit is low)")
    p.add_argument("--verbose", action="store_true", help="nbdkit -v")
    p.set_defaults(func=cmd_serve)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _default_region(path: str) -> None:
    """The demo: a labelled 1 GiB region (a QEMU NVDIMM backend as it stands) holding one
    512 MiB sector namespace named "demo"; the other half is free for create-namespace."""
    if os.path.exists(path):
        return
    from plugin.cli_namespace import call_offline
    from plugin.labels import LabelArea
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _say(f"creating {path}: a 1 GiB labelled region with one 512 MiB sector namespace "
         "(\"demo\", 4096-byte sectors)")
    LabelArea.create(path, DEFAULT_SIZE).close()
    reply = call_offline([path], {"op": "create-namespace", "mode": "sector", "size": "512M",
                                  "name": "demo"})
    if not reply["ok"]:
        raise SystemExit(f"bttctl serve: creating the demo namespace: {reply['error']}")


def _first_export(control: str) -> str | None:
    """The first enabled namespace the server reports, or None."""
    from plugin.control import request
    for _ in range(100):
        try:
            reply = request(control, {"op": "list"})
            break
        except OSError:
            time.sleep(0.05)
    else:
        return None
    exports = [ns["export"] for ns in reply.get("result", []) if ns.get("export")]
    return exports[0] if exports else None


def _listen_args(args, var: str):
    if args.tcp is not None:
        host, _, port = args.tcp.rpartition(":")
        host = host or "localhost"
        if not port.isdigit():
            raise SystemExit(f"bttctl serve: --tcp {args.tcp}: the port must be a number")
        return ["--ipaddr", host, "--port", port], f"nbd://{host}:{port}", (host, int(port))
    sock = os.path.abspath(args.socket or os.path.join(var, "nbd.sock"))
    return ["--unix", sock], sock, sock


def _ready(where, proc, timeout=30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if isinstance(where, str):
            if os.path.exists(where):
                return True
        else:
            try:
                socket.create_connection(where, timeout=0.5).close()
                return True
            except OSError:
                pass
        time.sleep(0.05)
    return False


def cmd_serve(args) -> int:
    regions = [os.path.realpath(r) for r in (args.region or [DEFAULT_REGION])]
    if not args.region:
        _default_region(regions[0])
    for r in regions:
        if not os.path.isfile(r):
            _say(f"bttctl serve: {r}: no such file")
            return 64
    var = os.path.dirname(regions[0])
    listen, where_text, where = _listen_args(args, var)
    control = os.path.abspath(args.control or (os.path.splitext(where)[0] + ".ctl"
                                               if isinstance(where, str)
                                               else os.path.join(var, "control.sock")))
    # Only a stale socket may be replaced: `--socket r.img` or `--control notes.txt`
    # must not delete the file that is there (plugin/paths.py).
    try:
        if isinstance(where, str):
            clear_socket_path(where, "NBD socket")
        clear_socket_path(control, "control socket")
    except OSError as e:
        _say(f"bttctl serve: {e.strerror}")
        return 1
    argv = ["nbdkit", "--foreground", *listen, *(["-r"] if args.readonly else []),
            *(["-v"] if args.verbose else []), "python", ENTRY,
            *[f"region={r}" for r in regions], f"durability={args.durability}",
            f"zero-flag={args.zero_flag}", f"threadmodel={args.threadmodel}",
            f"control={control}", *(["readonly=on"] if args.readonly else []),
            *([f"max-connections={args.max_connections}"] if args.max_connections else [])]
    env = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
    proc = subprocess.Popen(argv, env=env)
    stop = {"signal": None, "at": 0.0}

    def on_signal(signum, frame):
        stop["signal"], stop["at"] = signum, time.time()
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if not _ready(where, proc):
        rc = proc.wait() if proc.poll() is not None else (proc.kill() or proc.wait())
        _say(f"bttctl serve: nbdkit did not start (exit {rc})")
        return 1
    export = _first_export(control)
    if export is None:
        _say(f"bttctl serve: nothing to export yet; create a namespace with\n"
             f"  bttctl create-namespace --control {control} --size 256M --name db")
        export = "namespace0.0"
    if isinstance(where, str):
        uri = f"nbd+unix:///{export}?socket={where}"
        qemu = (f"-blockdev driver=nbd,server.type=unix,server.path={where},export={export},"
                f"node-name=disk0 -device virtio-blk-pci,drive=disk0")
        nbd_client = f"nbd-client -unix {where} /dev/nbd0 -N {export}"
    else:
        host, port = where
        uri = f"nbd://{host}:{port}/{export}"
        qemu = (f"-blockdev driver=nbd,server.type=inet,server.host={host},server.port={port},"
                f"export={export},node-name=disk0 -device virtio-blk-pci,drive=disk0")
        nbd_client = f"nbd-client {host} {port} /dev/nbd0 -N {export}"
    print(uri, flush=True)
    _say(f"""
serving {', '.join(regions)} ({args.durability} durability) at
  {uri}
control socket: {control}

  nbdinfo '{uri}'
  {nbd_client}
  qemu-system-x86_64 ... {qemu}
  fio --name=t --ioengine=nbd --uri='{uri}' --rw=randrw --bs=4k --size=256M

Ctrl-C stops the server.""")
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            # nbdkit waits for connected clients; after 10 s stop it regardless (the intent
            # journal keeps every acknowledged write across the SIGKILL).
            if stop["signal"] is not None and time.time() - stop["at"] > 10:
                _say("bttctl serve: clients still connected after 10 s; killing nbdkit")
                proc.kill()
    if stop["signal"] is not None:
        _say("bttctl serve: stopped")
        return 0
    return rc
