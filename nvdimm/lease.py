"""The lease file: a region's lock for file systems whose flock cannot be trusted across hosts.

`REGION.lease` holds one 512-byte record: who holds the region (pid, host, boot id, a
random token), when it last said so (`heartbeat`, wall-clock seconds) and for how long a
silence still counts as holding (`ttl`). A server renews it every `ttl / 4` seconds; another
server is refused while the record is fresh and may take it over once it is stale. Each
update is one `pwrite` of the whole record at offset 0 followed by `fdatasync`: that sync is
the update's one commit point, and a record torn by a crash fails its checksum.

The rules (docs/scale-out.md, "The lease file"):
* freshness is judged on the wall clock, so the hosts' clocks must agree to well under
  `ttl` (NTP does); a heartbeat from the future counts as fresh;
* a holder on this host and this boot whose process is gone is stale at once (a kill -9
  on this host need not wait out the ttl);
* two servers taking a stale lease at once both write, wait `SETTLE` seconds and read it
  back: only the one whose record is there goes on;
* a holder that could not renew within `ttl` or finds another holder's record stops at
  once (the plugin kills its own process): its lease may already be someone else's;
* the file is created 0600 without following links, must be a regular file of 0 or 512
  bytes, and is never deleted: releasing writes a record saying "released".
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import socket
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Callable

from btt_core.engine import boot_id
from nvdimm.errors import NdError

SUFFIX = ".lease"
RECORD_SIZE = 512
MAGIC = b"BTTLEAS1"
HEADER = 16            # magic, crc32 of the rest, length of the JSON text
TTL = 15.0             # seconds without a heartbeat after which a lease is stale
MIN_TTL, MAX_TTL = 2.0, 3600.0  # what a server may be given (lease-ttl=)
SETTLE = 1.0           # seconds a new holder waits before reading its record back
MODES = ("auto", "on", "off")
# File systems whose locks are enforced by another host's code (or not at all across
# hosts): lease=auto takes a lease there (docs/scale-out.md, "What the server relies on").
SHARED_FS = ("nfs", "nfs4", "ceph", "cifs", "smb3", "gfs2", "ocfs2", "glusterfs", "lustre",
             "beegfs", "gpfs", "9p", "fuse.")


def lease_path(region: str) -> str:
    return region + SUFFIX


def fs_type(path: str) -> str:
    """The type of the file system holding `path` (/proc/self/mounts, the longest match)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, fields[2]
    except OSError:
        return ""
    return kind


def wanted(region: str, mode: str) -> bool:
    """Whether `lease=mode` takes a lease for this region: auto does on shared file systems."""
    if mode not in MODES:
        raise NdError(errno.EINVAL, f"lease={mode}: use {', '.join(MODES)}")
    if mode != "auto":
        return mode == "on"
    kind = fs_type(region)
    return any(kind == s or (s.endswith(".") and kind.startswith(s)) for s in SHARED_FS)


def encode(record: dict) -> bytes:
    text = json.dumps(record, sort_keys=True).encode()
    if len(text) > RECORD_SIZE - HEADER:
        raise NdError(errno.ENAMETOOLONG, "the lease record does not fit in "
                      f"{RECORD_SIZE} bytes (host name too long?)")
    body = len(text).to_bytes(4, "little") + text.ljust(RECORD_SIZE - HEADER, b"\0")
    return MAGIC + zlib.crc32(body).to_bytes(4, "little") + body


def decode(raw: bytes) -> dict | None:
    """The record in `raw`, or None when there is none (an empty file) or it is damaged
    (torn, foreign, or not a record at all): every field is checked before it is used."""
    if len(raw) != RECORD_SIZE or raw[:8] != MAGIC:
        return None
    body = raw[12:]
    if zlib.crc32(body) != int.from_bytes(raw[8:12], "little"):
        return None
    n = int.from_bytes(body[:4], "little")
    if n > RECORD_SIZE - HEADER:
        return None
    try:
        rec = json.loads(body[4:4 + n])
    except ValueError:
        return None
    kinds: dict[str, type | tuple[type, ...]] = {
        "state": str, "pid": int, "host": str, "boot": str, "token": str,
        "heartbeat": (int, float), "ttl": (int, float)}
    if not isinstance(rec, dict) or any(not isinstance(rec.get(k), t) for k, t in kinds.items()):
        return None
    if rec["state"] not in ("held", "released") or not 0 < rec["ttl"] <= MAX_TTL:
        return None
    # bool is an int to isinstance; a pid must fit pid_t; NaN would read as stale at once
    if type(rec["pid"]) is not int or not 0 < rec["pid"] < 1 << 22:
        return None
    if not math.isfinite(rec["heartbeat"]):
        return None
    return rec


def describe(rec: dict, now: float) -> str:
    ago = now - rec["heartbeat"]
    when = f"{ago:.1f} s ago" if ago >= 0 else "in the future (check the clocks)"
    return f"pid {rec['pid']} on host {rec['host']} (last heartbeat {when}, ttl {rec['ttl']:g} s)"


def fresh(rec: dict, now: float) -> bool:
    """Whether a held record still holds: heartbeat within its ttl, and, for a holder on
    this host and boot, its process alive (kill -9 here need not wait out the ttl)."""
    if rec["state"] != "held" or now - rec["heartbeat"] >= rec["ttl"]:
        return False
    if rec["host"] == socket.gethostname() and rec["boot"] == boot_id().hex():
        try:
            os.kill(rec["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


class Lease:
    """A held lease. `start_heartbeat` renews it from a thread; `close` releases it."""

    def __init__(self, region: str, fd: int, ttl: float):
        self.region, self.path, self.fd, self.ttl = region, lease_path(region), fd, ttl
        self.token = uuid.uuid4().hex
        self.renewed = 0.0  # time.monotonic() of the last durable heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the record on disk ----------------------------------------------------------

    def _record(self, state: str) -> dict:
        return {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                "boot": boot_id().hex(), "token": self.token, "heartbeat": time.time(),
                "ttl": self.ttl}

    def _write(self, state: str) -> None:
        """One update: the whole record at offset 0, then fdatasync (its commit point)."""
        if os.pwrite(self.fd, encode(self._record(state)), 0) != RECORD_SIZE:
            raise NdError(errno.EIO, f"{self.path}: short write of the lease record")
        os.fdatasync(self.fd)

    def read(self) -> dict | None:
        """The record as the file system has it now, past this host's page cache where the
        file system allows it (O_DIRECT), so that another host's update is seen."""
        raw = read_record(self.path, self.fd)
        return decode(raw)

    def ours(self, rec: dict | None) -> bool:
        return rec is not None and rec["token"] == self.token and rec["state"] == "held"

    # ---- holding it --------------------------------------------------------------------

    def renew(self) -> None:
        """One heartbeat. Raises NdError if the lease is no longer ours, or was not renewed
        within its ttl (someone may have taken it meanwhile)."""
        late = time.monotonic() - self.renewed
        if late >= self.ttl:
            raise NdError(errno.ETIMEDOUT, f"{self.path}: not renewed for {late:.1f} s, "
                          f"longer than its ttl of {self.ttl:g} s; another server may hold it")
        started = time.monotonic()  # others judge by the heartbeat stamped before the write
        rec = self.read()
        if not self.ours(rec):
            who = describe(rec, time.time()) if rec else "a damaged record"
            raise NdError(errno.EBUSY, f"{self.path}: the lease was taken over by {who}")
        self._write("held")
        self.renewed = started

    def start_heartbeat(self, on_lost: Callable[[NdError | OSError], None]) -> None:
        """Renews every ttl / 4 from a daemon thread; `on_lost(error)` when it cannot."""
        def run():
            while not self._stop.wait(self.ttl / 4):
                try:
                    self.renew()
                except OSError as e:
                    on_lost(e)
                    return
        self._thread = threading.Thread(target=run, name=f"lease {self.region}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops renewing and marks the record released (the file stays: not ours to
        delete once another server may have used it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            if self.ours(self.read()):
                self._write("released")
        except OSError:
            pass  # the lease expires by itself
        finally:
            os.close(self.fd)


def stop_at_once(line: str, stop: Callable[[], None], wait: float = 1.0) -> None:
    """What a holder does once its lease is lost (a heartbeat's on_lost): says so in one
    line on stderr, then calls stop(), which must not return (SIGKILL, os._exit). The line
    is written from a thread given at most `wait` seconds: a full stderr pipe must not hold
    the stop up while other threads go on writing to a region that may be someone else's."""
    def say() -> None:
        try:
            os.write(2, (line + "\n").encode())
        except OSError:
            pass
    try:
        writer = threading.Thread(target=say, name="lease lost", daemon=True)
        writer.start()
        writer.join(wait)
    finally:
        stop()


def read_record(path: str, held_fd: int) -> bytes:
    """RECORD_SIZE bytes of the lease file at `path`, which must still be the file open as
    `held_fd`; b"" for an empty file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:  # tmpfs and a few others have no O_DIRECT
            raise
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        a, b = os.fstat(fd), os.fstat(held_fd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise NdError(errno.ESTALE, f"{path} was replaced by another file while held")
        with mmap.mmap(-1, 4096) as buf:  # page-aligned, as O_DIRECT wants
            n = os.preadv(fd, [buf], 0)
            return bytes(buf[:min(n, RECORD_SIZE)])
    finally:
        os.close(fd)


def refuse_if_held(region: str) -> None:
    """Raises NdError(EBUSY) if another server holds the region's lease now; writes nothing
    (what `bttctl serve` checks before it starts nbdkit, which then takes the lease)."""
    path = lease_path(region)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        rec = decode(read_record(path, fd))
    finally:
        os.close(fd)
    now = time.time()
    if rec is not None and fresh(rec, now):
        raise NdError(errno.EBUSY, f"{region} is leased by {describe(rec, now)}: {path} is "
                      f"fresh; use that server's control socket (--control)")


def acquire(region: str, ttl: float = TTL, settle: float = SETTLE) -> Lease:
    """Takes the region's lease, or raises NdError(EBUSY) naming its holder."""
    path = lease_path(region)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    lease = None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size not in (0, RECORD_SIZE):
            raise NdError(errno.EINVAL, f"{path} is not a lease file ({st.st_size} bytes, "
                          f"mode {stat.filemode(st.st_mode)}); move it away if no server "
                          "uses the region")
        lease = Lease(region, fd, ttl)
        started = time.monotonic()
        raw = read_record(path, fd)
        rec = decode(raw)
        now = time.time()
        if rec is None and raw and now - st.st_mtime < ttl:
            # A torn or foreign record, written recently: its writer may be alive.
            raise NdError(errno.EBUSY, f"{path} holds no valid lease record and was written "
                          f"{now - st.st_mtime:.1f} s ago; retry after {ttl:g} s")
        if rec is not None and fresh(rec, now):
            raise NdError(errno.EBUSY, f"{region} is leased by {describe(rec, now)}: "
                          f"{path} is fresh; it is taken over once it is {rec['ttl']:g} s "
                          "old (use that server's control socket, --control)")
        lease._write("held")
        lease.renewed = started
        if settle and time.monotonic() - started > settle / 2:
            # The read-back below catches a rival whose write lands within `settle` of
            # ours; a slow read or sync here would let a rival's later write go unseen.
            # Give it back (a rival that raced us then gives up too: both retry, neither
            # serves on a lease it cannot be sure of).
            if lease.ours(lease.read()):
                lease._write("released")
            raise NdError(errno.EBUSY, f"{path}: taking the stale lease over took "
                          f"{time.monotonic() - started:.1f} s (the file system is slow); "
                          "retry")
        time.sleep(settle)  # another server that read the stale record at the same time
        rec = lease.read()
        if not lease.ours(rec):
            who = describe(rec, time.time()) if rec else "a damaged record"
            raise NdError(errno.EBUSY, f"{region} is leased by {who}: it took {path} "
                          "over at the same time as this server")
        return lease
    except BaseException:
        os.close(fd)
        raise
