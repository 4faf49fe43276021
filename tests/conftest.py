import os
import subprocess

import pytest

from btt_core import Btt, Io

MiB = 1 << 20
GiB = 1 << 30


def mem_btt(size=32 * MiB, sector_size=4096, version="1.1", durability="none", arena_max=0,
            offset=0, journal=None, **kw):
    """A freshly formatted BTT on a memory image: (io, btt)."""
    io = Io.memory(offset + size)
    Btt.format_io(io, offset=offset, size=size, sector_size=sector_size, version=version,
                  arena_max=arena_max, **kw)
    return io, Btt.open_io(io, offset=offset, size=size, durability=durability, journal=journal)


def btt_file(path, size: int = 64 * MiB, **kw) -> str:
    """A label-less region file holding a fresh BTT (4096-byte sectors unless told)."""
    Btt.create(str(path), size=size, **kw).close()
    return str(path)


def sparse_file(path, size: int = 16 * MiB) -> str:
    """A region file of holes: no labels, no BTT, served raw."""
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def pattern(tag: int, lba: int, size: int) -> bytes:
    """Sector content that names its write: any mix-up or tear is visible."""
    head = f"w{tag:08d}-l{lba:010d}|".encode()
    return (head * (size // len(head) + 1))[:size]


@pytest.fixture
def tiny_fs(tmp_path):
    """A directory on a 3 MiB tmpfs, to fill a file system up (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


@pytest.fixture
def tmpfile(tmp_path):
    return str(tmp_path / "region.img")


def run(cmd, **kw):
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:" + env.get("PATH", "")
    kw.setdefault("env", env)
    return subprocess.run(cmd, **kw)



def pytest_collection_modifyitems(config, items):
    """Tests marked `long` run only in `make test-long` (BTT_LONG=1): the default suite
    stays under 10 minutes on 2 cores."""
    if os.environ.get("BTT_LONG"):
        return
    skip = pytest.mark.skip(reason="make test-long (BTT_LONG=1)")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)


_TEST_BUILD_RESULTS: dict[str, dict[str, tuple[str, str]]] = {}  # module path -> results


def pytest_pyfunc_call(pyfuncitem):
    """A test marked `testbuild` needs the engine's test build (tests/testbuild.py): unless
    this process runs it already, the marked tests of its module (those selected here) run
    together in a child interpreter that does, and each reports the child's outcome."""
    if pyfuncitem.get_closest_marker("testbuild") is None:
        return None
    import testbuild
    if testbuild.active():
        return None
    key = str(pyfuncitem.path)
    if key not in _TEST_BUILD_RESULTS:
        same = [i.nodeid for i in pyfuncitem.session.items
                if str(i.path) == key and i.get_closest_marker("testbuild") is not None]
        _TEST_BUILD_RESULTS[key] = testbuild.run_in_test_build(same)
    outcome, text = _TEST_BUILD_RESULTS[key].get(pyfuncitem.name,
                                                 ("failed", "the test build did not run it"))
    if outcome == "skipped":
        pytest.skip(text)
    assert outcome == "passed", text
    return True
