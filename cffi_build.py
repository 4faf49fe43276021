"""Builds btt_core._btt_cffi, the C engine's Python binding (cffi API mode, out of line).

The C sources stay real .c/.h files under btt_core/; Python sees exactly what btt.h
declares. Variants, chosen by environment variables:

* BTT_SANITIZE=1 (or =address): AddressSanitizer and UBSan (the fuzz tests);
  BTT_SANITIZE=thread: ThreadSanitizer (the concurrency tests, tests/test_tsan.py).
* BTT_MUTATIONS=1: the test build, btt_core._btt_cffi_test, with the switches of
  btt_test.h that break the engine on purpose (tests/testbuild.py builds it into
  build/test-engine/; btt_core/_lib.py loads it). The production module has none of them.
* BTT_WERROR=1: warnings are errors (CI sets it, .ci/run).

Only the API cffi needs is exported (-fvisibility=hidden): the module's init function.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# In dependency order: each file uses only what the ones before it define (btt_int.h).
SOURCES = ["errmsg.c", "crc32c.c", "backend.c", "flog.c", "layout.c", "map.c", "read.c",
           "journal.c", "commit.c", "write.c", "extents.c", "open.c", "btt.c", "check.c",
           "rawio.c", "writelog.c"]
MUTATIONS = os.environ.get("BTT_MUTATIONS") == "1"
MODULE = "btt_core._btt_cffi_test" if MUTATIONS else "btt_core._btt_cffi"
# What Python sees, in this order; the test build adds its switches (btt_test.h).
HEADERS = ["btt.h", "writelog.h"] + (["btt_test.h"] if MUTATIONS else [])


def header_cdef(name: str) -> str:
    """A header as cffi's cdef: the header is the single description of the C API. cdef
    knows no preprocessor, so only `#define NAME <integer>` lines are kept from it."""
    lines = []
    with open(os.path.join(HERE, "btt_core", name)) as f:
        for line in f:
            if line.startswith("#"):
                parts = line.split()
                if parts[0] == "#define" and len(parts) == 3 and parts[2].rstrip("uU").isdigit():
                    lines.append(f"#define {parts[1]} {parts[2].rstrip('uU')}\n")
                continue
            lines.append(line)
    return "".join(lines)


# The checker's progress callback, implemented in Python (btt_core/checker.py).
CALLBACKS = """
extern "Python" void _check_progress(void *ctx, int arena, uint64_t done, uint64_t total);
"""

ffibuilder = FFI()
ffibuilder.cdef("".join(header_cdef(h) for h in HEADERS) + CALLBACKS)

_flags = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread",
          "-fvisibility=hidden"]
_link = ["-pthread"]
if os.environ.get("BTT_WERROR") == "1":
    _flags.append("-Werror")
if MUTATIONS:
    _flags.append("-DBTT_MUTATIONS")
_sanitize = os.environ.get("BTT_SANITIZE")
if _sanitize == "thread":
    _flags += ["-fsanitize=thread", "-fno-omit-frame-pointer", "-O1"]
    _link += ["-fsanitize=thread"]
elif _sanitize:
    _flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-O1"]
    _link += ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    MODULE,
    "".join(f'#include "{h}"\n' for h in HEADERS),
    # pip wants paths relative to the project; ffibuilder.compile() (the sanitizer and test
    # builds, built directly) changes directory first, so they need them absolute.
    sources=[os.path.join(HERE if _sanitize or MUTATIONS else "", "btt_core", s)
             for s in SOURCES],
    include_dirs=[os.path.join(HERE, "btt_core")],
    extra_compile_args=_flags,
    extra_link_args=_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
