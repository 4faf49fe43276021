"""`bttctl serve`: run nbdkit with our plugin and tell the user how to attach.

With no arguments it serves ./var/region0.img, creating it first: a sparse, labelled 1 GiB
region with one 512 MiB sector-mode namespace, "demo", with 4096-byte sectors. The export
URI goes to stdout; the ready-to-paste client commands and messages to stderr. Ctrl-C or
SIGTERM stops nbdkit cleanly. TLS is in bttctl/tls.py, socket activation (LISTEN_FDS) in
bttctl/activation.py, the pid file in bttctl/pidfile.py.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

from bttctl import activation, tls
from bttctl.exits import EXIT_USAGE
from bttctl.pidfile import PidFile, PidFileError
from control.sockets import clear_socket_path, socket_ident, unlink_if_same
from nvdimm import lease
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
    p.add_argument("--tls", choices=tls.MODES, help="nbdkit's TLS: off (the default "
                   "without credentials), on (TLS or plain text), require (the default with "
                   "credentials: plain-text clients are refused)")
    p.add_argument("--tls-certificates", metavar="DIR", help="X.509: DIR holds ca-cert.pem, "
                   "server-cert.pem and server-key.pem (mode 0600); see docs/serving.md")
    p.add_argument("--tls-psk", metavar="FILE", help="pre-shared keys, IDENTITY:HEXKEY lines "
                   "(psktool -u NAME -p FILE), mode 0600")
    p.add_argument("--tls-verify-peer", action="store_true", help="with --tls-certificates: "
                   "accept only clients with a certificate signed by ca-cert.pem")
    p.add_argument("--pid-file", metavar="PATH", help="write bttctl's pid here once serving; "
                   "removed on a clean exit")
    p.add_argument("--lease", choices=lease.MODES, default="auto",
                   help="a lease file beside each region (REGION.lease, renewed by the "
                   "server, refused while fresh) on top of its lock: auto (default) takes one "
                   "on network and cluster file systems. See docs/scale-out.md")
    p.add_argument("--lease-ttl", type=float, default=lease.TTL, metavar="SECONDS",
                   help=f"seconds without a heartbeat after which another server may take "
                   f"the lease over (default {lease.TTL:g}; renewed every quarter of it)")
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


def _listen_args(args, var: str, fds: list[int]):
    """(nbdkit options, address, default control path); SystemExit(64) when the address is
    malformed. With sockets passed by systemd (fds), nbdkit gets no listening option: it
    takes them from LISTEN_FDS, and the address is read from the first."""
    if fds:
        if args.tcp is not None or args.socket:
            _say("bttctl serve: --socket/--tcp with socket activation: the socket comes from "
                 "systemd (LISTEN_FDS); drop the option")
            raise SystemExit(64)
        where = activation.address(fds[0])
        if isinstance(where, str):
            return [], where, os.path.splitext(where)[0] + ".ctl"
        return [], where, os.path.join(var, f"nbd-{where[1]}.ctl")
    if args.tcp is not None:
        host, _, port = args.tcp.rpartition(":")
        host = host or "localhost"
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            _say(f"bttctl serve: --tcp {args.tcp}: the port must be a number from 1 to 65535")
            raise SystemExit(64)
        # One control socket per port: two TCP servers with regions in one directory must
        # not fight over one path (bttctl finds it, see bttctl/namespace.py default_control).
        return (["--ipaddr", host, "--port", port], (host, int(port)),
                os.path.join(var, f"nbd-{int(port)}.ctl"))
    sock = os.path.abspath(args.socket or os.path.join(var, "nbd.sock"))
    return ["--unix", sock], sock, os.path.splitext(sock)[0] + ".ctl"


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


def _check_locks(regions, lease_mode: str) -> str | None:
    """Why a region cannot be served (another server holds its lock or its lease), or None:
    said here in one line, before nbdkit starts."""
    from nvdimm.regionfile import check_region_free
    for r in regions:
        try:
            check_region_free(r, lease_mode)
        except OSError as e:
            return e.strerror or str(e)
    return None


class _Stderr:
    """nbdkit's stderr, passed on line by line. Until the server is up, lines are held
    back: if nbdkit then exits, its error becomes our one line ("nbdkit did not start:
    EBUSY: ... is locked by another server"), not a pointer to a message above."""

    # "nbdkit: error: /…/nbdkit_btt.py: get_ready: error: EBUSY: …" -> "EBUSY: …"
    PREFIX = re.compile(r"^nbdkit: (?:error: )?(?:\S+nbdkit_btt\.py: \w+: error: )?")

    def __init__(self, pipe):
        self.pipe, self.held, self.passing = pipe, [], False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for line in iter(self.pipe.readline, b""):
            text = line.decode(errors="replace")
            with self.lock:
                if self.passing:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                else:
                    self.held.append(text)

    def pass_on(self) -> None:
        """The server is up: what was held back, and everything from now on, goes out."""
        with self.lock:
            sys.stderr.write("".join(self.held))
            sys.stderr.flush()
            self.held, self.passing = [], True

    def failure(self) -> str:
        """After nbdkit exited: what it said, as one line (the error first); the plugin's
        own warnings ("nbdkit-btt: ...") are passed on as they are."""
        self.thread.join(5)
        with self.lock:
            held, self.held = self.held, []
        ours = [t for t in held if t.startswith("nbdkit-btt:")]
        said = [self.PREFIX.sub("", t.strip()) for t in held if t not in ours and t.strip()]
        said.sort(key=lambda t: "error" not in t)  # stable: the error lines first
        line = "; ".join(said)
        # A warning that the refusal repeats ("namespace0.0 not enabled: EUCLEAN: ...") is
        # said once, in the refusal.
        sys.stderr.write("".join(t for t in ours if t.split(": ", 2)[-1].strip() not in line))
        return line


def cmd_serve(args) -> int:
    regions = [os.path.realpath(r) for r in (args.region or [DEFAULT_REGION])]
    if not args.region:
        _default_region(regions[0])
    for r in regions:
        if not os.path.isfile(r):
            _say(f"bttctl serve: {r}: no such file")
            return EXIT_USAGE
    if args.max_connections is not None and args.max_connections < 1:
        _say("bttctl serve: --max-connections must be 1 or more")
        return EXIT_USAGE
    if not lease.MIN_TTL <= args.lease_ttl <= lease.MAX_TTL:
        _say(f"bttctl serve: --lease-ttl must be {lease.MIN_TTL:g}..{lease.MAX_TTL:g} seconds")
        return EXIT_USAGE
    if not 1 <= args.threads <= 256:
        _say("bttctl serve: --threads must be 1..256")
        return EXIT_USAGE
    try:
        creds = tls.from_args(args.tls, args.tls_certificates, args.tls_psk,
                              args.tls_verify_peer)
        fds = activation.listen_fds(os.environ)
    except (tls.TlsError, activation.ActivationError) as e:
        _say(f"bttctl serve: {e}")
        return EXIT_USAGE
    var = os.path.dirname(regions[0])
    listen, where, default_control = _listen_args(args, var, fds)
    control = os.path.abspath(args.control or default_control)
    if not isinstance(where, str):
        warning = tls.exposure_warning(creds, *where)
        if warning:
            _say(warning)
    pid_file = PidFile(args.pid_file) if args.pid_file else None
    # Only a stale socket may be replaced: `--socket r.img` or `--control notes.txt`
    # must not delete the file that is there (control/sockets.py). A socket systemd
    # passed is systemd's: neither replaced nor removed.
    try:
        if isinstance(where, str) and not fds:
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
    locked = _check_locks(regions, args.lease)
    if locked:
        _say(f"bttctl serve: {locked}")
        return 1
    try:
        if pid_file:
            pid_file.claim()
    except PidFileError as e:
        _say(f"bttctl serve: {e}")
        return 1
    try:
        return _serve(args, regions, listen, where, control, creds, fds, pid_file)
    finally:
        if pid_file:
            pid_file.release()


def _serve(args, regions, listen, where, control, creds, fds, pid_file) -> int:
    threads = ["--threads", str(args.threads)] if args.threadmodel == "parallel" else []
    # --exit-with-parent: nbdkit must not outlive this wrapper (a kill -9 of bttctl would
    # leave a server nobody stops, holding the region lock).
    argv = ["nbdkit", "--foreground", "--exit-with-parent", *listen, *creds.nbdkit_args(),
            *threads, *(["-r"] if args.readonly else []),
            *(["-v"] if args.verbose else []), "python", ENTRY,
            *[f"region={r}" for r in regions], f"durability={args.durability}",
            f"zero-flag={args.zero_flag}", f"threadmodel={args.threadmodel}",
            f"control={control}", f"lease={args.lease}", f"lease-ttl={args.lease_ttl:g}",
            *(["readonly=on"] if args.readonly else []),
            *([f"max-connections={args.max_connections}"] if args.max_connections else []),
            *([f"log-writes={os.path.abspath(args.log_writes)}"] if args.log_writes else [])]
    env = activation.child_env(dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get(
        "PATH", "")), fds)
    stop = {"signals": 0, "at": 0.0}
    started: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        stop["signals"] += 1
        if stop["signals"] == 1:
            stop["at"] = time.monotonic()
            for p in started:
                p.send_signal(signal.SIGTERM)

    # Ctrl-C and SIGTERM (a service manager's stop) are one and the same, from before
    # nbdkit exists: a SIGTERM in between must not end bttctl without its clean-up.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    proc = subprocess.Popen(activation.command(argv, fds), env=env, pass_fds=fds,
                            stderr=subprocess.PIPE)
    started.append(proc)
    assert proc.stderr is not None
    nbdkit_stderr = _Stderr(proc.stderr)
    if stop["signals"]:
        proc.send_signal(signal.SIGTERM)
    reply = _ready(control, proc)
    if reply is None:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        why = nbdkit_stderr.failure()
        _say(f"bttctl serve: nbdkit did not start: {why}" if why else
             f"bttctl serve: nbdkit did not start (exit {rc}) and said nothing")
        return 1
    nbdkit_stderr.pass_on()
    # What nbdkit does not remove itself, or only on a clean exit: removed when we stop,
    # if the paths still name the sockets this server bound.
    ours = [where] if isinstance(where, str) and not fds else []
    owned = [(p, socket_ident(p)) for p in ours + [control]]
    try:
        if pid_file:
            pid_file.publish()
        if stop["signals"] == 0:
            _banner(args, regions, where, control, reply.get("result", []), creds)
        return _wait(proc, stop, control)
    finally:
        for path, ident in owned:
            unlink_if_same(path, ident)


def _attach(where, export: str, sector_size: int, creds: tls.Tls | None = None):
    """(URI, nbd-client command, QEMU options) for one export, in their TLS form when the
    server has TLS on. nbd-client needs the export's block size (-b): its default of 512
    makes the kernel send requests a 4096-byte export refuses, and mkfs fails."""
    creds = creds or tls.Tls()
    if isinstance(where, str):
        uri = f"nbd+unix:///{export}?socket={where}"
        nbd_client = f"nbd-client -unix {where} /dev/nbd0 -N {export} -b {sector_size}"
        server, host = f"server.type=unix,server.path={where}", "localhost"
    else:
        host, port = where
        uri = f"nbd://{host}:{port}/{export}"
        nbd_client = f"nbd-client {host} {port} /dev/nbd0 -N {export} -b {sector_size}"
        server = f"server.type=inet,server.host={host},server.port={port}"
    qemu_object, qemu_tls = creds.qemu_object(host)
    return (creds.uri(uri), nbd_client + creds.nbd_client_args(),
            f"{qemu_object}-blockdev driver=nbd,{server},export={export}{qemu_tls},"
            f"node-name=disk0 -device virtio-blk-pci,drive=disk0")


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


def _banner(args, regions, where, control, listed: list[dict], creds: tls.Tls) -> None:
    exports = _exports({"result": listed})
    place = where if isinstance(where, str) else f"{where[0]}:{where[1]}"
    secured = f", TLS {creds.mode}" if creds.enabled else ""
    head = (f"\nserving {', '.join(regions)} ({args.durability} durability"
            f"{', read-only' if args.readonly else ''}{secured}) at {place}\n"
            f"control socket: {control}")
    notes = "".join(f"\n  ({note})" for note in creds.notes())
    if not exports:
        _, nbd_client, _ = _attach(where, "db", 4096, creds)
        _say(f"{head}\n\nno namespaces yet: {_create_hint(args, control, listed)}\n"
             f"then attach it by its name:\n  {nbd_client}{notes}\n\nCtrl-C stops the server.")
        return
    first = exports[0]
    export = first.get("name") or first["dev"]  # the alt_name outlives a renumbering
    uri, nbd_client, qemu = _attach(where, export, first["sector_size"], creds)
    print(uri, flush=True)
    lines = "\n".join(_export_lines(listed))
    plain_uri, _, _ = _attach(where, export, first["sector_size"])
    fio_uri = creds.fio_uri(plain_uri)
    fio = ("" if fio_uri is None else
           f"  fio --name=t --ioengine=nbd --uri='{fio_uri}' --rw=randrw "
           f"--bs={first['sector_size']} \\\n      --size={min(256, first['size'] >> 20)}M")
    _say(f"""{head}

exports (by alt_name or device name):
{lines}

  nbdinfo '{uri}'
  {nbd_client}
  qemu-system-x86_64 ... {qemu}
{fio}{notes}

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
