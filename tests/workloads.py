"""Real workloads through the real nbdkit server, recorded with log-writes= for the replayer
(tests/test_replay_log.py; docs/write-log.md).

Each workload gets a fresh region file holding a BTT, a copy of it as the replay's base
image, and a server recording to a new log. The clients are the real ones: fio's nbd
engine, qemu-img, and the kernel's ext4 on a loop device over nbdfuse.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass

from conftest import MiB, btt_file, run
from nbd_helpers import ENV, Server
from testbuild import server_env


@dataclass
class Recorded:
    base: str  # the region file before the workload
    log: str
    region: str


def have(*tools: str) -> bool:
    return all(shutil.which(t, path=ENV["PATH"]) for t in tools)


def can_mount() -> str | None:
    """Why the ext4 workload cannot run here, or None."""
    if os.geteuid() != 0:
        return "mounting needs root"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if not have("nbdfuse", "losetup", "mkfs.ext4", "e2fsck"):
        return "needs nbdfuse, losetup, mkfs.ext4 and e2fsck"
    return None


def recording(tmp_path, durability: str, size: int, workload, *, mutation: str = "",
              sector_size: int = 4096, prepare=None) -> Recorded:
    """Runs workload(server, tmp_path) against a fresh BTT served with log-writes=, and
    returns the files the replayer needs. prepare(server, tmp_path), if given, runs first on
    a server that does not record (mkfs: the replay starts from a file system). mutation
    names a broken engine (BTT_TEST_MUTATION) for the recorded run."""
    region = btt_file(tmp_path / "region.img", size, sector_size=sector_size)
    if prepare is not None:
        with Server(tmp_path, [region], f"durability={durability}") as s:
            prepare(s, tmp_path)
    base = str(tmp_path / "base.img")
    shutil.copyfile(region, base)
    log = str(tmp_path / "writes.log")
    env = server_env(mutation) if mutation else None
    with Server(tmp_path, [region], f"durability={durability}", f"log-writes={log}",
                env=env) as s:
        workload(s, tmp_path)
    return Recorded(base, log, region)


# ---- the workloads -----------------------------------------------------------------------

def fio_verify(server, tmp_path, *, fsync: int = 4, number_ios: int = 200) -> None:
    """fio writes mixed block sizes with an fsync (NBD FLUSH) every `fsync` writes, then
    reads everything back and verifies it."""
    run(["fio", "--name=v", "--ioengine=nbd", f"--uri={server.uri()}", "--rw=randwrite",
         "--bsrange=4k-64k", "--bs_unaligned=0", "--blockalign=4k", f"--fsync={fsync}",
         "--size=8M", "--iodepth=4", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
         f"--number_ios={number_ios}", "--randseed=14"], cwd=str(tmp_path), env=ENV)


def qemu_img_convert(server, tmp_path, *, size: int = 6 * MiB) -> None:
    """qemu-img copies an image with holes and data onto the export (-n: the export is
    there already), flushing at the end as it does."""
    src = tmp_path / "src.raw"
    rng = random.Random(14)
    with open(src, "wb") as f:
        f.truncate(size)
        for _ in range(24):
            f.seek(rng.randrange(size // 4096) * 4096)
            f.write(rng.randbytes(4096 * rng.randint(1, 16)))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(src),
         server.uri()], env=ENV)


@contextlib.contextmanager
def loop_device(server, tmp_path):
    """The export as a block device with 4096-byte sectors: nbdfuse makes it a file, a loop
    device a disk, so every request is sector-aligned as a kernel nbd device's would be."""
    mnt = tmp_path / "fuse"
    mnt.mkdir(exist_ok=True)
    fuse = subprocess.Popen(["nbdfuse", str(mnt / "disk"), server.uri()], env=ENV)
    loop = None
    try:
        for _ in range(200):
            if (mnt / "disk").exists():
                break
            time.sleep(0.05)
        loop = run(["losetup", "-f", "--show", "-b", "4096", str(mnt / "disk")]).stdout.strip()
        yield loop
    finally:
        if loop:
            run(["losetup", "-d", loop], check=False)
        run(["umount", str(mnt)], check=False)
        fuse.wait(10)


def mkfs_ext4(server, tmp_path) -> None:
    with loop_device(server, tmp_path) as dev:
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", dev])


def ext4_fsstress(server, tmp_path, *, ops: int = 120, seed: int = 14) -> None:
    """A small fsstress of our own on the ext4 mkfs_ext4 made: creates, appends,
    overwrites, renames, fsyncs, deletes and directories, decided by a seeded RNG."""
    fs = tmp_path / "fs"
    fs.mkdir(exist_ok=True)
    with loop_device(server, tmp_path) as dev:
        run(["mount", dev, str(fs)])
        try:
            fsstress(str(fs), ops, seed)
        finally:
            run(["umount", str(fs)])


def fsstress(root: str, ops: int, seed: int) -> None:
    """File-system operations that exercise ext4's journal: each fsync is an NBD FLUSH."""
    rng = random.Random(seed)
    files: list[str] = []
    dirs = [root]
    for i in range(ops):
        op = rng.random()
        if op < 0.3 or not files:
            path = os.path.join(rng.choice(dirs), f"f{i}")
            with open(path, "wb") as f:
                f.write(rng.randbytes(rng.choice((100, 4096, 20000, 70000))))
                if rng.random() < 0.5:
                    os.fsync(f.fileno())
            files.append(path)
        elif op < 0.45:
            path = rng.choice(files)
            with open(path, "r+b") as f:
                f.seek(rng.randrange(0, 60000))
                f.write(rng.randbytes(rng.randint(1, 9000)))
                os.fsync(f.fileno())
        elif op < 0.6:
            old = rng.choice(files)
            new = os.path.join(rng.choice(dirs), f"r{i}")
            os.rename(old, new)
            files[files.index(old)] = new
            if rng.random() < 0.5:
                dfd = os.open(os.path.dirname(new), os.O_RDONLY)
                os.fsync(dfd)
                os.close(dfd)
        elif op < 0.75:
            path = files.pop(rng.randrange(len(files)))
            os.unlink(path)
        elif op < 0.85:
            d = os.path.join(rng.choice(dirs), f"d{i}")
            os.mkdir(d)
            dirs.append(d)
        else:
            os.sync()
