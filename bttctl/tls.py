"""TLS for `bttctl serve`: check the credentials before nbdkit starts, turn them into
nbdkit's own TLS options, and say how each client connects with them.

nbdkit does the TLS (GnuTLS); this module only refuses what nbdkit would accept and then
serve badly: `--tls require` with no credentials (nbdkit would fall back to a system
directory), a PSK file that is a symlink or readable by others, a half X.509 directory.
Every refusal is one line, raised as TlsError.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass

MODES = ("off", "on", "require")
# The names nbdkit looks for in --tls-certificates DIR (nbdkit-tls(1)).
CA_CERT = "ca-cert.pem"
SERVER_FILES = (CA_CERT, "server-cert.pem", "server-key.pem")
SECRET_FILES = ("server-key.pem",)
# What a client needs beside ca-cert.pem when the server checks client certificates.
CLIENT_FILES = ("client-cert.pem", "client-key.pem")
# QEMU's tls-creds-psk object reads this one name in its dir= (qemu-block-drivers(7)).
QEMU_PSK_NAME = "keys.psk"
MAX_PSK_FILE = 1 << 20  # a PSK file is a few lines; anything larger is not one


class TlsError(Exception):
    """A bad --tls combination or credential: one line, said before nbdkit starts."""


@dataclass(frozen=True)
class Tls:
    mode: str = "off"
    certificates: str | None = None  # absolute X.509 directory
    psk: str | None = None  # absolute PSK file
    username: str | None = None  # the PSK file's first identity, for printed commands
    verify_peer: bool = False

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def nbdkit_args(self) -> list[str]:
        if not self.enabled:
            return []
        creds = ([f"--tls-psk={self.psk}"] if self.psk
                 else [f"--tls-certificates={self.certificates}"])
        return [f"--tls={self.mode}", *creds,
                *(["--tls-verify-peer"] if self.verify_peer else [])]

    def uri(self, uri: str) -> str:
        """The libnbd URI in its TLS form: nbds scheme, credentials as query parameters
        (nbdinfo and nbdcopy accept local files in URIs; fio's nbd engine does not, see
        docs/serving.md)."""
        if not self.enabled:
            return uri
        scheme, rest = uri.split("://", 1)
        if self.psk:  # libnbd takes the PSK identity from the URI's user part
            rest, query = f"{self.username}@{rest}", f"tls-psk-file={self.psk}"
        else:
            query = f"tls-certificates={self.certificates}"
        return f"nbds{scheme[3:]}://{rest}{'&' if '?' in rest else '?'}{query}"

    def fio_uri(self, uri: str) -> str | None:
        """The URI for fio's nbd engine, or None when it cannot connect: fio does not let
        libnbd read local files named in a URI (tls-psk-file, tls-certificates), so PSK is
        out of reach and X.509 uses libnbd's default CA directory (see notes())."""
        if not self.enabled:
            return uri
        if self.psk:
            return None
        scheme, rest = uri.split("://", 1)
        return f"nbds{scheme[3:]}://{rest}"

    def qemu_object(self, host: str) -> tuple[str, str]:
        """(the -object option, what to append to -blockdev) for QEMU, or ("", "")."""
        if not self.enabled:
            return "", ""
        if self.psk:
            return (f"-object tls-creds-psk,id=tls0,endpoint=client,"
                    f"dir={os.path.dirname(self.psk)},username={self.username} ",
                    ",tls-creds=tls0")
        # QEMU checks the server certificate's name; over a Unix socket it has no host
        # name of its own, so it is given the one the certificate was made for.
        return (f"-object tls-creds-x509,id=tls0,endpoint=client,dir={self.certificates} ",
                f",tls-creds=tls0,tls-hostname={host}")

    def nbd_client_args(self) -> str:
        """What kernel nbd-client adds: X.509 only (it has no PSK option)."""
        if not self.certificates or not self.enabled:
            return ""
        client = (f" -certfile DIR/{CLIENT_FILES[0]} -keyfile DIR/{CLIENT_FILES[1]}"
                  if self.verify_peer else "")
        return f" -cacertfile {os.path.join(self.certificates, CA_CERT)}{client}"

    def notes(self) -> list[str]:
        """What the printed commands assume, in a sentence each."""
        if not self.enabled:
            return []
        out = []
        if self.mode == "on":
            out.append("--tls on: plain-text clients are served too (--tls require refuses "
                       "them)")
        if self.psk:
            out.append("kernel nbd-client has no PSK support: serve with --tls-certificates "
                       "to attach /dev/nbd over TLS")
            if os.path.basename(self.psk) != QEMU_PSK_NAME:
                out.append(f"QEMU reads its PSK from dir/{QEMU_PSK_NAME}: copy "
                           f"{self.psk} there (mode 0600)")
            out.append("fio's nbd engine cannot read a PSK file (libnbd refuses local files "
                       "in its URIs): use --tls-certificates for fio")
        else:
            out.append(f"fio checks the server only against {CA_CERT} in /etc/pki/libnbd "
                       "(root) or ~/.pki/libnbd: without it, it connects unchecked")
        if self.verify_peer:
            out.append(f"--tls-verify-peer: each client needs {CA_CERT}, {CLIENT_FILES[0]} "
                       f"and {CLIENT_FILES[1]} signed by {CA_CERT}, in its own directory (DIR)")
        return out


def from_args(mode: str | None, certificates: str | None, psk: str | None,
              verify_peer: bool) -> Tls:
    """The checked TLS settings. Without --tls, credentials mean `require`: whoever
    made a key wants it used."""
    if certificates and psk:
        raise TlsError("--tls-certificates and --tls-psk: give one (nbdkit would silently "
                       "use the PSK)")
    if mode is None:
        mode = "require" if certificates or psk else "off"
    if mode == "off":
        if certificates or psk or verify_peer:
            given = "--tls-psk" if psk else ("--tls-certificates" if certificates
                                             else "--tls-verify-peer")
            raise TlsError(f"--tls off with {given}: drop one, or use --tls require")
        return Tls()
    if not certificates and not psk:
        raise TlsError(f"--tls {mode} needs credentials: --tls-psk FILE (make one with "
                       "psktool -u NAME -p FILE) or --tls-certificates DIR (X.509, see "
                       "docs/serving.md)")
    if verify_peer and not certificates:
        raise TlsError("--tls-verify-peer checks client certificates: it needs "
                       "--tls-certificates DIR, not --tls-psk")
    if psk:
        psk = os.path.abspath(psk)
        return Tls(mode, psk=psk, username=_psk_identity(psk))
    certificates = os.path.abspath(certificates or "")
    _check_x509_dir(certificates)
    return Tls(mode, certificates=certificates, verify_peer=verify_peer)


def _open_secret(path: str, what: str) -> int:
    """An fd on a file only its owner (us or root) can read; TlsError otherwise. Opened
    without following links: a link could point the server at any file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        why = "is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e)).lower()
        raise TlsError(f"{what} {path}: {why}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_mode & 0o077:
        problem = (f"is readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                   f"chmod 600 {path}")
    elif st.st_uid not in (os.geteuid(), 0):
        problem = f"belongs to uid {st.st_uid}, not to this user or root"
    elif st.st_size > MAX_PSK_FILE:
        problem = f"is {st.st_size} bytes, too large for a key file"
    if problem:
        os.close(fd)
        raise TlsError(f"{what} {path} {problem}")
    return fd


def _psk_identity(path: str) -> str:
    """The first identity of a psktool file (lines of IDENTITY:HEXKEY); TlsError when a
    line is not one."""
    fd = _open_secret(path, "--tls-psk")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_PSK_FILE + 1)
    first = None
    for n, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        name, sep, key = line.partition(b":")
        try:
            ok = bool(sep and name and key) and len(bytes.fromhex(key.decode("ascii"))) > 0
        except (UnicodeDecodeError, ValueError):
            ok = False
        if not ok:
            raise TlsError(f"--tls-psk {path}: line {n} is not IDENTITY:HEXKEY (make the file "
                           "with psktool -u NAME -p FILE)")
        first = first or name.decode("utf-8", "replace")
    if first is None:
        raise TlsError(f"--tls-psk {path}: no keys in the file (psktool -u NAME -p FILE)")
    return first


def _check_x509_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise TlsError(f"--tls-certificates {path}: not a directory")
    missing = [f for f in SERVER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise TlsError(f"--tls-certificates {path}: missing {', '.join(missing)} (nbdkit "
                       f"needs {', '.join(SERVER_FILES)}; see docs/serving.md)")
    for name in SECRET_FILES:
        os.close(_open_secret(os.path.join(path, name), "--tls-certificates"))


def is_loopback(host: str) -> bool:
    """Whether every address HOST names is a loopback address: only then is plain text
    private to this machine. A name that does not resolve counts as not loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = [str(info[4][0]).split("%")[0] for info in infos]  # "fe80::1%eth0"
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def exposure_warning(tls: Tls, host: str, port: int) -> str | None:
    """The warning for a TCP listener other machines can reach, or None."""
    if is_loopback(host) or tls.mode == "require":
        return None
    if tls.mode == "on":
        return (f"bttctl serve: warning: {host}:{port} is reachable from other machines and "
                "--tls on still serves plain-text clients: use --tls require")
    return (f"bttctl serve: warning: {host}:{port} is reachable from other machines in plain "
            "text (anyone on the path reads and writes the disk): add --tls-psk FILE (make it "
            "with psktool -u NAME -p FILE) or --tls-certificates DIR")
