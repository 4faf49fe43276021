"""Untrusted metadata: damage gives a clear error, never a crash (also under ASan/UBSan)."""
import errno
import glob
import os
import shutil
import subprocess
import sys

import pytest

from btt_core import Btt, BttError

import fuzz_corrupt
from conftest import MiB
from testbuild import sanitizer_runtime

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_fuzz_damaged_metadata():
    outcomes = fuzz_corrupt.run(1500, seed=12345)
    kinds = {k for k, _ in outcomes}
    assert kinds == {"info_bytes", "info_field", "flog", "map", "backup"}
    assert any(r == "refused" for _, r in outcomes) and any(r == "served" for _, r in outcomes)


@pytest.mark.parametrize("cut", [4096, 8192, 5 * MiB, 16 * MiB, 30 * MiB, 32 * MiB - 4096])
def test_truncated_file(tmpfile, cut):
    with Btt.create(tmpfile, size=32 * MiB) as b:
        b.write(3, b"x" * 4096)
    os.truncate(tmpfile, cut)
    with pytest.raises(BttError) as e:
        Btt.open(tmpfile)
    assert e.value.errno in fuzz_corrupt.ALLOWED and str(e.value)
    with pytest.raises(BttError):  # a namespace said to extend past the file is refused too
        Btt.open(tmpfile, size=32 * MiB)


def test_damaged_primary_info_block_means_no_btt(tmpfile):
    Btt.create(tmpfile, size=32 * MiB).close()
    with open(tmpfile, "r+b") as f:
        f.seek(4096 + 100)
        f.write(b"\xff")
    with pytest.raises(BttError) as e:
        Btt.open(tmpfile)
    assert e.value.errno == errno.ENODEV and "checksum" in str(e.value)


def test_second_arena_damage_is_corruption_not_absence():
    from btt_core import Io
    io = Io.memory(40 * MiB)
    Btt.format_io(io, size=40 * MiB, arena_max=16 * MiB)
    a1 = Btt.open_io(io, durability="none").arenas[1]
    io.poke(4096 + a1["start"] + 8, b"\x00")
    with pytest.raises(BttError) as e:
        Btt.open_io(io)
    assert e.value.errno == errno.EUCLEAN and "arena 1" in str(e.value)


def test_fuzz_under_address_and_undefined_sanitizers(tmp_path):
    asan = sanitizer_runtime("libasan.so", "libasan8 libubsan1")
    build = tmp_path / "asan"
    env = dict(os.environ, BTT_SANITIZE="1")
    subprocess.run([sys.executable, "-c",
                    f"import cffi_build; cffi_build.ffibuilder.compile(tmpdir={str(build)!r})"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    for py in glob.glob(os.path.join(ROOT, "btt_core", "*.py")):
        shutil.copy(py, build / "btt_core")
    so = glob.glob(str(build / "btt_core" / "_btt_cffi*.so"))
    assert so, "sanitized build produced no module"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{build}:{HERE}", "LD_PRELOAD": asan,
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    check = subprocess.run(["/usr/bin/python3", "-c", "import btt_core; print(btt_core.__file__)"],
                           env=env, capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0 and str(build) in check.stdout, check.stderr
    p = subprocess.run(["/usr/bin/python3", os.path.join(HERE, "fuzz_corrupt.py"), "400", "99"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ERROR: AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr
