"""Builds btt_core._btt_cffi, the C engine's Python binding (cffi API mode, out of line).

The C sources stay real .c/.h files under btt_core/; Python sees exactly what btt.h
declares. Set BTT_SANITIZE=1 (or =address) to build with AddressSanitizer and UBSan (the fuzz
tests do), BTT_SANITIZE=thread for ThreadSanitizer (the concurrency tests do).
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["btt.c", "check.c", "backend.c", "raw.c", "crc32c.c", "writelog.c"]
HEADERS = ["btt.h", "writelog.h"]  # what Python sees, in this order


def public_api() -> str:
    """The public headers as cffi's cdef: they are the single description of the C API.
    cdef knows no preprocessor, so only `#define NAME <integer>` lines are kept from them."""
    lines = []
    for header in HEADERS:
        lines += _cdef_lines(os.path.join(HERE, "btt_core", header))
    return "".join(lines)


def _cdef_lines(path: str) -> list:
    lines = []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                parts = line.split()
                if parts[0] == "#define" and len(parts) == 3 and parts[2].rstrip("uU").isdigit():
                    lines.append(f"#define {parts[1]} {parts[2].rstrip('uU')}\n")
                continue
            lines.append(line)
    return lines


# The checker's progress callback, implemented in Python (btt_core/checker.py).
CALLBACKS = """
extern "Python" void _check_progress(void *ctx, int arena, uint64_t done, uint64_t total);
"""

ffibuilder = FFI()
ffibuilder.cdef(public_api() + CALLBACKS)

_flags = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]
_link = ["-pthread"]
_sanitize = os.environ.get("BTT_SANITIZE")
if _sanitize == "thread":
    _flags += ["-fsanitize=thread", "-fno-omit-frame-pointer", "-O1"]
    _link += ["-fsanitize=thread"]
elif _sanitize:
    _flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-O1"]
    _link += ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "btt_core._btt_cffi",
    "".join(f'#include "{h}"\n' for h in HEADERS),
    # pip wants paths relative to the project; ffibuilder.compile() (the sanitizer test's
    # direct build) changes directory first, so it needs them absolute.
    sources=[os.path.join(HERE if os.environ.get("BTT_SANITIZE") else "", "btt_core", s)
             for s in SOURCES],
    include_dirs=[os.path.join(HERE, "btt_core")],
    extra_compile_args=_flags,
    extra_link_args=_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
