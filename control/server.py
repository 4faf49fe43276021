"""The control socket: JSON lines over a Unix socket, one request object per line, one reply
per line. Transport only; what the requests mean is the handler's business.

Safety rules (docs/serving.md, "Command line"):
* the socket is created mode 0600; `private_socket_dir()` makes a 0700 directory for it;
* peers are identified with SO_PEERCRED: only the server's own uid and root may talk;
* lines are bounded (64 KiB, whether or not the newline has come), each request has a
  total deadline (a client trickling a byte at a time cannot hold a slot), malformed or
  deeply nested input gets an error reply, and nothing a client sends can raise out of
  the server;
* handler calls from all clients are serialised by one lock, which the I/O path never takes.

Replies: {"id": ..., "ok": true, "result": ...} or
         {"id": ..., "ok": false, "errno": "EBUSY", "code": 16, "error": "message"}.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import struct
import tempfile
import threading
import time

from btt_core.errors import errno_name
from control.sockets import clear_socket_path, socket_ident, unlink_if_same

MAX_LINE = 64 * 1024
REQUEST_TIMEOUT = 30.0  # from the first byte a request may take, to its newline
MAX_CLIENTS = 32


def error_text(err_name: str, text: str) -> str:
    """'EBUSY: text', unless the text already starts with the errno's name: how a refusal
    reads in one line, in the CLI and in the server's log alike."""
    return text if text.startswith(err_name) else f"{err_name}: {text}"


def error_reply(req_id, err: int, message: str) -> dict:
    return {"id": req_id, "ok": False, "errno": errno_name(err), "code": err,
            "error": message}


def private_socket_dir(base: str | None = None) -> str:
    """A fresh 0700 directory (under base, or the system temp dir) to hold a socket."""
    return tempfile.mkdtemp(prefix="bttctl-", dir=base)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    """Serves `handler(request: dict) -> result` on a Unix socket from background threads."""

    def __init__(self, path: str, handler, *, request_timeout: float = REQUEST_TIMEOUT,
                 max_line: int = MAX_LINE, max_clients: int = MAX_CLIENTS):
        self.path = os.path.abspath(path)
        self.handler = handler
        self.request_timeout = request_timeout
        self.max_line = max_line
        self.lock = threading.Lock()  # the "bus lock": one state change at a time
        self._clients = threading.BoundedSemaphore(max_clients)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ident = None

    def start(self) -> None:
        """Binds and starts accepting. Call after nbdkit has forked (threads die in a fork).
        A stale socket is replaced; a live one (another server's), or anything that is not
        a socket, is refused and left alone (control/sockets.py)."""
        clear_socket_path(self.path, "control socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # born 0600: a chmod after bind would follow a swapped-in link
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        self._ident = socket_ident(self.path)
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, args=(sock,),
                                        name="control-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._sock:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        unlink_if_same(self.path, self._ident)  # only the socket we bound, nothing put there since

    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._stopping:
            try:
                conn, _ = sock.accept()
            except OSError as e:
                if self._stopping:
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    time.sleep(0.1)  # out of descriptors: do not spin holding the GIL
                continue
            if not self._clients.acquire(blocking=False):
                self._send(conn, error_reply(None, errno.EAGAIN, "too many control clients"))
                conn.close()
                continue
            threading.Thread(target=self._serve_client, args=(conn,), daemon=True,
                             name="control-client").start()

    def _send(self, conn, reply: dict) -> bool:
        try:
            data = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
        except (ValueError, TypeError, RecursionError) as e:  # e.g. an id nested deep
            data = json.dumps(error_reply(None, errno.EINVAL, f"reply cannot be encoded: "
                                          f"{type(e).__name__}")).encode() + b"\n"
        try:
            conn.settimeout(self.request_timeout)  # not what the last recv had left
            conn.sendall(data)
            return True
        except OSError:
            return False

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            uid = peer_uid(conn)
            if uid not in (0, os.getuid()):
                self._send(conn, error_reply(None, errno.EACCES,
                                             f"uid {uid} may not use this control socket"))
                return
            buf = b""
            deadline = time.monotonic() + self.request_timeout
            while True:
                nl = buf.find(b"\n")
                if (nl if nl >= 0 else len(buf)) > self.max_line:
                    self._send(conn, error_reply(None, errno.E2BIG,
                                                 f"request longer than {self.max_line} bytes"))
                    return
                if nl < 0:
                    # The deadline is for the whole request, not per recv: one byte every
                    # few seconds must not hold a client slot forever.
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._send(conn, error_reply(None, errno.ETIMEDOUT,
                                                     "no complete request before the timeout "
                                                     f"({self.request_timeout:g} s)"))
                        return
                    conn.settimeout(left)
                    try:
                        chunk = conn.recv(65536)
                    except socket.timeout:
                        continue  # the deadline check above replies
                    if not chunk:
                        return
                    buf += chunk
                    continue
                line, buf = buf[:nl], buf[nl + 1:]
                if line.strip() and not self._send(conn, self._answer(line)):
                    return
                deadline = time.monotonic() + self.request_timeout  # the next request's
        except OSError:
            return
        finally:
            conn.close()
            self._clients.release()

    def _answer(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return error_reply(None, errno.EINVAL, f"not a JSON object: {e}")
        except RecursionError:  # json's C decoder gives up on deep nesting this way
            return error_reply(None, errno.EINVAL, "not a JSON object: nested too deeply")
        if not isinstance(request, dict):
            return error_reply(None, errno.EINVAL, "a request must be a JSON object")
        req_id = request.get("id")
        with self.lock:
            try:
                return {"id": req_id, "ok": True, "result": self.handler(request)}
            except OSError as e:
                return error_reply(req_id, e.errno or errno.EIO, e.strerror or str(e))
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                return error_reply(req_id, errno.EIO, f"internal error: {type(e).__name__}: {e}")


def request(path: str, req: dict, timeout: float = 30.0) -> dict:
    """Client side: sends one request, returns the reply object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # a refusing server (wrong uid, too many clients) replies and hangs up early
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("control socket closed without a reply")
            buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])
