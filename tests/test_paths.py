"""Hostile paths (issue 16, item 1): what the server finds at a path it writes to or removes
is checked first. A symbolic link at the journal path is never written through nor deleted,
anything but a regular file is refused as a journal, a new journal is private (0600), and
region files are never opened for writing through a link."""
import errno
import os
import stat

import pytest

from btt_core import Btt, BttError, Io
from nvdimm.labels import LabelArea

from conftest import MiB, btt_file, pattern
from nbd_helpers import Server, connect


@pytest.fixture
def region(tmp_path):
    return btt_file(tmp_path / "region.img", 64 * MiB)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_bytes(b"precious contents\n")
    return path


def test_symlinked_journal_is_refused_and_left_alone(region, victim):
    journal = region + ".journal"
    os.symlink(victim, journal)
    for readonly in (False, True):
        with pytest.raises(BttError) as e:
            Btt.open(region, readonly=readonly)
        assert e.value.errno == errno.ELOOP and journal in str(e.value)
        assert "symbolic link" in str(e.value)
    assert os.path.islink(journal) and victim.read_bytes() == b"precious contents\n"


def test_journal_further_in_follows_the_same_rule(tmp_path, victim):
    path = str(tmp_path / "r.img")
    Btt.create(path, offset=8 * MiB, size=32 * MiB).close()
    os.symlink(victim, f"{path}.journal.{8 * MiB}")
    with pytest.raises(BttError, match="symbolic link"):
        Btt.open(path, offset=8 * MiB, size=32 * MiB)
    assert victim.read_bytes() == b"precious contents\n"


@pytest.mark.parametrize("kind", ["fifo", "directory", "dangling link"])
def test_journal_must_be_a_regular_file(region, kind):
    journal = region + ".journal"
    {"fifo": os.mkfifo, "directory": os.mkdir,
     "dangling link": lambda p: os.symlink("/nonexistent/journal", p)}[kind](journal)
    with pytest.raises(BttError) as e:
        Btt.open(region)
    assert e.value.errno in (errno.ELOOP, errno.EINVAL) and journal in str(e.value)
    assert os.path.lexists(journal) and not os.path.exists("/nonexistent/journal")


def test_c_open_refuses_links_and_devices_for_writing(tmp_path, victim):
    """The C check on its own, for paths that change after Python looked at them."""
    link = str(tmp_path / "link")
    os.symlink(victim, link)
    for create in (False, True):
        with pytest.raises(BttError) as e:
            Io.file(link, create=create, mode=0o600)
        assert e.value.errno == errno.ELOOP and "symbolic link" in str(e.value)
    with pytest.raises(BttError) as e:
        Io.file("/dev/null")  # a character device, for writing
    assert e.value.errno == errno.EINVAL and "not a regular file" in str(e.value)
    Io.file(link, readonly=True).close()  # reading through a link the user named is fine
    assert victim.read_bytes() == b"precious contents\n"


def test_fresh_journal_is_private(region):
    old = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        b = Btt.open(region)
        assert stat.S_IMODE(os.lstat(region + ".journal").st_mode) == 0o600
        b.close()
    finally:
        os.umask(old)
    assert not os.path.lexists(region + ".journal")  # committed and removed at close


def test_close_never_removes_a_swapped_journal_path(region, victim):
    """A clean shutdown removes the journal only while its path still names the file the
    engine had open: a link (or another file) put there since is not ours."""
    journal = region + ".journal"
    b = Btt.open(region)
    b.write(0, pattern(1, 0, 4096))
    os.rename(journal, journal + ".moved")
    os.symlink(victim, journal)
    b.close()
    assert os.path.islink(journal) and victim.read_bytes() == b"precious contents\n"
    os.unlink(journal)
    os.unlink(journal + ".moved")
    with Btt.open(region) as b:
        assert b.read(0, 1) == pattern(1, 0, 4096)


def test_region_files_are_not_written_through_links(region, tmp_path):
    link = str(tmp_path / "link.img")
    os.symlink(region, link)
    with pytest.raises(BttError) as e:
        LabelArea.detect(link, writable=True)
    assert e.value.errno == errno.ELOOP and "symbolic link" in str(e.value)
    with pytest.raises(BttError, match="symbolic link"):
        Btt.open(link)
    with pytest.raises(BttError, match="regular file"):
        Io.file("/dev/null")


@pytest.mark.e2e
def test_server_refuses_a_symlinked_journal(tmp_path, region, victim):
    nbd = pytest.importorskip("nbd")
    journal = region + ".journal"
    os.symlink(victim, journal)
    with Server(tmp_path, [region]) as s:
        with pytest.raises(nbd.Error):
            connect(s)  # the namespace is not served
    log = s.output()
    assert "symbolic link" in log and journal in log and "Traceback" not in log
    assert os.path.islink(journal) and victim.read_bytes() == b"precious contents\n"


@pytest.mark.e2e
def test_server_resolves_a_region_link_it_was_given(tmp_path, region):
    """A link named on the command line is the user's choice: it is resolved once, and the
    journal lives beside the real file."""
    pytest.importorskip("nbd")
    link = str(tmp_path / "link.img")
    os.symlink(region, link)
    with Server(tmp_path, [link], "commit-ms=60000") as s:
        h = connect(s)
        h.pwrite(pattern(2, 0, 4096), 0)
        assert os.path.isfile(region + ".journal") and not os.path.lexists(link + ".journal")
        h.shutdown()
    with Btt.open(region) as b:
        assert b.read(0, 1) == pattern(2, 0, 4096)


@pytest.mark.parametrize("kind", ["another user's file", "a hard link"])
def test_a_planted_journal_is_refused_and_left_alone(region, victim, kind):
    """A regular file at the journal path that the server did not make for itself: one
    owned by another uid, or a hard link to someone's file. Neither is written to nor
    replayed from."""
    journal = region + ".journal"
    if kind == "a hard link":
        os.link(victim, journal)
        expected = "2 hard links"
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another uid")
        with open(journal, "wb") as f:
            f.write(b"planted\n")
        os.chown(journal, 65534, 65534)
        expected = "belongs to uid 65534"
    for readonly in (False, True):
        with pytest.raises(BttError) as e:
            Btt.open(region, readonly=readonly)
        assert e.value.errno == errno.EPERM and expected in str(e.value)
    assert victim.read_bytes() == b"precious contents\n"
    assert os.path.exists(journal)
