"""Parsers for sysfs-style attribute text, with the kernel's rules (kstrtoull, kstrtobool,
nd_uuid_parse) and its output formats."""
from __future__ import annotations

import errno
import uuid as uuidlib

from nvdimm.constants import ALT_NAME_MAX
from nvdimm.errors import NdError


def parse_uuid(text: str) -> uuidlib.UUID:
    """Like nd_uuid_parse: 16 hex pairs, each optionally preceded by '-' or ':'."""
    s = text.strip()
    out, i = bytearray(), 0
    while len(out) < 16:
        if i < len(s) and s[i] in "-:":
            i += 1
        pair = s[i:i + 2]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            raise NdError(errno.EINVAL, f"{text!r} is not a uuid (expected 16 hex pairs, e.g. "
                          "11111111-2222-3333-4444-555555555555)")
        out.append(int(pair, 16))
        i += 2
    if i != len(s):
        raise NdError(errno.EINVAL, f"{text!r} has trailing characters after the uuid")
    return uuidlib.UUID(bytes=bytes(out))


def parse_u64(text: str) -> int:
    """Like kstrtoull(buf, 0): decimal, 0x-prefixed hex, or 0-prefixed octal."""
    s = text.strip()
    base, digits = 10, s
    if s[:2].lower() == "0x":
        base, digits = 16, s[2:]
    elif len(s) > 1 and s[0] == "0":
        base, digits = 8, s[1:]
    try:
        if not digits or not digits.isalnum() or not digits.isascii():
            raise ValueError
        value = int(digits, base)
    except ValueError:
        raise NdError(errno.EINVAL, f"{text!r} is not a number (decimal, 0x… or 0…)") from None
    if value >= 1 << 64:
        raise NdError(errno.ERANGE, f"{text!r} does not fit 64 bits")
    return value


def parse_bool(text: str) -> bool:
    """Like kstrtobool: 1/0, y/n, on/off (first characters decide, case-insensitive)."""
    s = text.strip().lower()
    if s[:1] in ("1", "y") or s[:2] == "on":
        return True
    if s[:1] in ("0", "n") or s[:2] == "of":
        return False
    raise NdError(errno.EINVAL, f"{text!r} is not a boolean; valid: 1, 0, y, n, on, off")


def check_alt_name(value: str) -> str:
    """The alt_name to store: at most 63 bytes of UTF-8 (a 64-byte label field), no NUL."""
    name = value.strip()
    try:
        encoded = name.encode()
    except UnicodeEncodeError:
        raise NdError(errno.EINVAL, "alt_name must be valid UTF-8 text") from None
    if len(encoded) > ALT_NAME_MAX or "\0" in name:
        raise NdError(errno.EINVAL, f"alt_name is at most {ALT_NAME_MAX} bytes without NUL "
                      f"(got {len(encoded)})")
    return name


def parse_sector_size(text: str, choices) -> int:
    """One of `choices`, written in decimal (the kernel's nd_size_select_store)."""
    try:
        size = int(text.strip())
    except ValueError:
        size = 0
    if size not in choices:
        raise NdError(errno.EINVAL, f"sector_size {text.strip()!r}; valid: "
                      f"{', '.join(map(str, choices))}")
    return size


def size_select(selected: int | None, choices) -> str:
    """'512 [4096]': the kernel's nd_size_select_show format."""
    return " ".join(f"[{c}]" if c == selected else str(c) for c in choices)
