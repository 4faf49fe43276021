"""nbdkit callbacks, in lifecycle order (as nbdkit's file plugin lays them out).

    nbdkit -U SOCK python plugin/nbdkit_btt.py region=FILE [region=FILE ...]
           [durability=group|strict|none] [zero-flag=on|off] [threadmodel=...]
           [commit-ms=50] [control=PATH] [readonly=on] [max-connections=N]
           [lease=auto|on|off] [lease-ttl=SECONDS]

Data callbacks are one line each: the namespace's backend does one C call (sector mode)
or one syscall (raw mode). Errors become the errno the client sees via nbdkit.set_error.
"""
import errno
import os
import resource
import signal
import sys
import traceback
from typing import Any

import nbdkit

from btt_core.engine import MAX_EXTENTS, MAX_REQUEST
from btt_core.errors import errno_name, one_line
from btt_core.writelog import WriteLog
from control.server import error_text
from control.sockets import clear_socket_path
from nvdimm import lease
from nvdimm.regionfile import RegionLock, lock_region
from plugin.exports import Registry
from plugin.pythread import (
    DEFAULT_THREAD_MODEL,
    ConnectionThreads,
    ThreadStatePin,
    keep_thread_state,
)

API_VERSION = 2

__all__ = ["API_VERSION", "config", "config_complete", "thread_model", "get_ready", "after_fork",
           "cleanup", "list_exports", "default_export", "open", "close", "export_description",
           "get_size", "block_size", "is_rotational", "can_write", "can_flush", "can_fua",
           "can_zero", "can_fast_zero", "can_trim", "can_extents", "can_multi_conn", "pread",
           "pwrite", "flush", "zero", "trim", "extents"]

THREAD_MODELS = {"serialize_all": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
                 "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
                 "parallel": nbdkit.THREAD_MODEL_PARALLEL}
settings: dict[str, Any] = {
    "regions": [], "durability": "group", "zero-flag": "off", "readonly": "off",
    "threadmodel": DEFAULT_THREAD_MODEL, "commit-ms": "50", "control": None,
    "max-connections": None, "lease": "auto", "lease-ttl": lease.TTL}
registry = Registry(settings)
control_server = None
connections = {"open": 0}  # NBD connections past open(), under registry.lock
DEFAULT_MAX_CONNECTIONS = 256
FD_HEADROOM = 64  # descriptors kept for nbdkit itself (~12), region files and journals, and
                  # the control socket's clients (up to 32)
# Each region file's lock (and lease, docs/scale-out.md), held until the process exits.
region_locks: list[RegionLock] = []


class Connection:
    """Per-connection handle. It keeps the backend it opened: if the namespace is disabled
    (forced) or switches mode, this connection's requests fail instead of reaching
    whatever the namespace serves next."""

    __slots__ = ("export", "backend", "readonly", "pread", "pwrite", "thread_state", "workers")

    def __init__(self, export, readonly, parallel: bool):
        self.export, self.backend, self.readonly = export, export.backend, readonly
        self.pread, self.pwrite = export.backend.pread, export.backend.pwrite  # bound once
        self.thread_state: ThreadStatePin | None = None
        # PARALLEL: requests run on nbdkit's worker threads, each pinned by its first read
        # or write (plugin/pythread.py). Serialized models pay nothing for it.
        self.workers = ConnectionThreads() if parallel else None
        if self.workers is not None:
            self.pread = self.workers.pinned(self.pread)
            self.pwrite = self.workers.pinned(self.pwrite)


class Refusal(Exception):
    """An expected failure of a non-data callback (a locked region, an unknown export, a
    connection over the cap): nbdkit logs it as its message alone, see below."""


def _format_exception(exc, *args, **kwargs):
    # nbdkit's Python plugin reports every exception a callback raises through
    # traceback.format_exception (plugins/python/errors.c). A Refusal is not a bug, and a
    # traceback in the log would say it was: report its message, one line. The other
    # arguments pass through untouched, so every calling form keeps working.
    value = args[0] if args else kwargs.get("value")
    for e in (value, exc):
        if isinstance(e, Refusal):
            return [f"{e}\n"]
    return _original_format_exception(exc, *args, **kwargs)


_original_format_exception = traceback.format_exception
traceback.format_exception = _format_exception


def _error(e: OSError) -> Refusal:
    """Tells nbdkit which errno the client gets, and returns what to raise: a Refusal, so
    that the log gets one line naming the errno and no traceback. nbdkit logs every failed
    request, a misbehaving client can send thousands, and a misaligned request or one after
    a forced disable is the client's to handle, not a bug here."""
    err = e.errno or errno.EIO
    nbdkit.set_error(err)
    return Refusal(error_text(errno_name(err), e.strerror or str(e)))


# ---- configuration ------------------------------------------------------------------

def config(key, value):
    if key == "region":
        # Absolute because nbdkit chdirs to / later; resolved once here, because a link
        # the user named is theirs to follow, while every later open refuses links.
        settings["regions"].append(os.path.realpath(value))
    elif key == "durability":
        if value not in ("group", "strict", "none"):
            raise ValueError(f"durability={value}: use group, strict or none")
        settings[key] = value
    elif key in ("zero-flag", "readonly"):
        if value not in ("on", "off"):
            raise ValueError(f"{key}={value}: use on or off")
        settings[key] = value
    elif key == "threadmodel":
        if value not in THREAD_MODELS:
            raise ValueError(f"threadmodel={value}: use one of {', '.join(THREAD_MODELS)}")
        settings[key] = value
    elif key == "commit-ms":
        if not value.isdigit() or not 1 <= int(value) <= 60000:
            raise ValueError(f"commit-ms={value}: use 1..60000")
        settings[key] = value
    elif key in ("control", "log-writes"):
        settings[key] = os.path.abspath(value)
    elif key == "max-connections":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"max-connections={value}: use a number of connections, 1 or more")
        settings[key] = int(value)
    elif key == "lease":
        if value not in lease.MODES:
            raise ValueError(f"lease={value}: use {', '.join(lease.MODES)}")
        settings[key] = value
    elif key == "lease-ttl":
        try:
            ttl = float(value)
        except ValueError:
            ttl = 0.0
        if not lease.MIN_TTL <= ttl <= lease.MAX_TTL:
            raise ValueError(f"lease-ttl={value}: use {lease.MIN_TTL:g}..{lease.MAX_TTL:g} "
                             "seconds")
        settings[key] = ttl
    else:
        raise ValueError(f"unknown parameter {key}={value}; known: region, durability, "
                         f"zero-flag, threadmodel, commit-ms, control, readonly, "
                         f"max-connections, lease, lease-ttl, log-writes")


def config_complete():
    settings["max-connections"] = _connection_cap(settings["max-connections"])
    if not settings["regions"]:
        raise ValueError("give at least one region=FILE")
    seen: dict[tuple[int, int], str] = {}
    for path in settings["regions"]:
        if not os.path.isfile(path):
            raise ValueError(f"region={path}: no such file")
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in seen:  # two engines over one BTT would corrupt it
            raise ValueError(f"region={path} is the same file as region={seen[key]}")
        seen[key] = path


def _connection_cap(wanted):
    """Raises the soft descriptor limit to the hard one and returns how many NBD connections
    to serve at once. With descriptors exhausted nbdkit's accept loop spins at full CPU
    logging EMFILE while new clients hang; a cap below the limit turns that into prompt,
    logged refusals. A connection costs nbdkit one descriptor, three under the parallel
    thread model (its socket and a status pipe, measured); FD_HEADROOM keeps room for the
    region files, journals and control clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    per_connection = 3 if settings["threadmodel"] == "parallel" else 1
    if soft == resource.RLIM_INFINITY:
        fit = DEFAULT_MAX_CONNECTIONS
    else:
        fit = max(1, (soft - FD_HEADROOM) // per_connection)
    if wanted is None:
        return min(DEFAULT_MAX_CONNECTIONS, fit)
    if wanted > fit:
        print(f"nbdkit-btt: max-connections={wanted} lowered to {fit}: the file descriptor "
              f"limit is {soft}", file=sys.stderr)
    return min(wanted, fit)


def thread_model():
    return THREAD_MODELS[settings["threadmodel"]]


def get_ready():
    # Lock the files and read labels and info blocks now, so that errors reach the user
    # before nbdkit daemonizes; the engines are opened in after_fork, where their commit
    # timers survive. A namespace that cannot be enabled (a damaged BTT, say) stays
    # disabled and is reported; if nothing at all can be served, the server does not start.
    try:
        for path in settings["regions"]:
            region_locks.append(lock_region(path, settings["lease"], settings["lease-ttl"]))
            registry.add_region(path)
        if settings["control"]:  # bound in after_fork; refuse a bad path before anything starts
            clear_socket_path(settings["control"], "control socket")
        if settings.get("log-writes"):  # recording (docs/write-log.md): created, never reused
            settings["writelog"] = WriteLog.create(settings["log-writes"],
                                                   note=f"nbdkit-btt pid {os.getpid()}")
    except OSError as e:
        raise Refusal(one_line(e)) from None
    for r in registry.regions:
        # A file with neither labels nor a BTT may be anything (a typo, random bytes, a
        # disk image meant for something else): it is served raw, so say it once.
        if not r.labelled and any(ns.active_mode == "raw" for ns in r.namespaces.values()):
            print(f"nbdkit-btt: warning: {r.path} has no labels and no BTT: served raw, every "
                  f"byte as it is, {'read-only' if r.read_only else 'read-write'}",
                  file=sys.stderr)
    problems = [(name, err) for r in registry.regions for name, err in r.probe_errors.items()]
    for name, err in problems:
        print(f"nbdkit-btt: {name} not enabled: {one_line(err)}", file=sys.stderr)
    if problems and not any(ns.active_mode for r in registry.regions
                            for ns in r.namespaces.values()):
        name, err = problems[0]
        raise Refusal(f"{name}: {one_line(err)}; run `bttctl check-namespace`")


def _lease_lost(e: OSError) -> None:
    # Another server may be writing this region now: every further write of ours could
    # corrupt its BTT. Stop as a kill -9 would; the intent journal is on the region's file
    # system for whoever holds it next (docs/scale-out.md, "The lease file").
    lease.stop_at_once(f"nbdkit-btt: {one_line(e)}; stopping this server at once",
                       lambda: os.kill(os.getpid(), signal.SIGKILL))


def after_fork():
    global control_server
    # The lease names this process (nbdkit may have forked since get_ready): renew it now,
    # then from a thread, which must start after the fork to exist at all.
    for held in region_locks:
        if held.lease is not None:
            try:
                held.lease.renew()
            except OSError as lost:
                raise Refusal(one_line(lost)) from None
            held.lease.start_heartbeat(_lease_lost)
    # `nbdkit -r` reaches the plugin only per connection (open's readonly argument), so
    # the engines open read-write unless the file itself is read-only or readonly=on
    # (which `bttctl serve --readonly` passes with -r): then recovery and journal replay
    # happen in memory only, and nothing at all is written to the region file.
    for name, e in registry.sync():
        print(f"nbdkit-btt: {name} not served: {e}", file=sys.stderr)
    if settings["control"]:
        from control.server import ControlServer
        from control.verbs import handle
        control_server = ControlServer(settings["control"], lambda req: handle(registry, req))
        try:
            control_server.start()
        except OSError as e:
            control_server = None
            raise Refusal(e.strerror or str(e)) from None


def cleanup():
    if control_server:
        control_server.stop()
    registry.close_all()
    if settings.get("writelog"):
        settings["writelog"].close()
    for held in region_locks:  # after the engines' last commit: a released lease is free
        held.close()
    region_locks.clear()


# ---- connections ----------------------------------------------------------------------

def list_exports(readonly, is_tls):
    return registry.list_exports()


def default_export(readonly, is_tls):
    return registry.default()


def open(readonly):
    name = nbdkit.export_name()
    with registry.lock:
        if connections["open"] >= settings["max-connections"]:
            raise Refusal(f"connection refused: {connections['open']} connections are open, "
                          f"the most this server takes (max-connections="
                          f"{settings['max-connections']})")
        export = registry.lookup(name)
        if export is None:
            known = ", ".join(n for n, _ in registry.list_exports()) or "none"
            raise Refusal(f"no export named {name!r}; exports: {known}")
        export.clients += 1
        connections["open"] += 1
        h = Connection(export, readonly or export.backend.readonly,
                       settings["threadmodel"] == "parallel")
    # Last, so that no failure can follow it: nbdkit calls close() only after open() succeeded.
    h.thread_state = keep_thread_state()  # plugin/pythread.py: no thread state per request
    return h


def close(h):
    with registry.lock:
        h.export.clients -= 1
        connections["open"] -= 1
    if h.workers is not None and h.workers.release():
        nbdkit.debug("worker thread states of this connection stay allocated (a worker "
                     "still running, or Python 3.12+)")
    if h.thread_state is not None and not h.thread_state.release():
        nbdkit.debug("connection closed on another thread than it opened on: "
                     "its Python thread state stays allocated")


def export_description(h):
    return h.export.description(h.backend)


def get_size(h):
    return h.backend.size


def block_size(h):
    ss = h.backend.sector_size
    return (ss, ss, MAX_REQUEST)


def is_rotational(h):
    return False


def can_write(h):
    return not h.readonly


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_zero(h):
    return True


def can_fast_zero(h):
    # Always advertised: NBD lets a server refuse a fast zero it cannot do cheaply (the
    # client then writes zeros itself), and nbdkit 1.32 aborts the whole server on an
    # assertion when a client sends FAST_ZERO that was not advertised.
    return True


def can_trim(h):
    b = h.backend
    return b.mode == "raw" or b.zero_flag


def can_extents(h):
    # base:allocation: holes are reported only where a read is sure to return zeros
    # (extents.c; rawio.c for raw exports).
    return True


def can_multi_conn(h):
    # One engine per namespace per process: a flush on any connection commits them all.
    return True


# ---- data ------------------------------------------------------------------------------

def pread(h, buf, offset, flags):
    try:
        h.pread(buf, offset)
    except OSError as e:
        raise _error(e) from None


def pwrite(h, buf, offset, flags):
    try:
        h.pwrite(buf, offset, flags & nbdkit.FLAG_FUA)
    except OSError as e:
        raise _error(e) from None


def flush(h, flags):
    try:
        h.backend.flush()
    except OSError as e:
        raise _error(e) from None


def zero(h, count, offset, flags):
    may_trim = bool(flags & nbdkit.FLAG_MAY_TRIM)
    if flags & nbdkit.FLAG_FAST_ZERO and not h.backend.zero_is_fast(may_trim):
        # The client gets ENOTSUP and zeroes some other way. Returning (not raising) after
        # set_error(EOPNOTSUPP) is how nbdkit's Python plugin takes it without a traceback.
        nbdkit.set_error(errno.EOPNOTSUPP)
        return
    try:
        h.backend.zero(offset, count, may_trim, bool(flags & nbdkit.FLAG_FUA))
    except OSError as e:
        raise _error(e) from None


def trim(h, count, offset, flags):
    try:
        h.backend.zero(offset, count, True, bool(flags & nbdkit.FLAG_FUA))
    except OSError as e:
        raise _error(e) from None


def extents(h, count, offset, flags):
    # One C call; a partial answer (at most MAX_EXTENTS, one under REQ_ONE) is what NBD
    # allows, and the client asks again from where it ends.
    try:
        return h.backend.block_status(offset, count,
                                      1 if flags & nbdkit.FLAG_REQ_ONE else MAX_EXTENTS)
    except OSError as e:
        raise _error(e) from None
