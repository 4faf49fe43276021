"""Many threads writing and reading overlapping and disjoint LBAs (lanes, RTT, map locks)."""
import random
import threading

import pytest

from btt_core import Btt
from conftest import MiB

TAG = 16  # bytes of header: thread, sequence and LBA; the rest repeats them


def content(thread, seq, lba, size):
    head = f"{thread:03d}:{seq:08d}:{lba:04d}|"[:TAG].encode().ljust(TAG, b"#")
    return head * (size // TAG)


@pytest.mark.parametrize("durability", ["group", "strict", "none"])
def test_threads_overlapping_and_disjoint(tmpfile, durability):
    b = Btt.create(tmpfile, size=40 * MiB, durability=durability)
    b.start_timer(5)
    ss, shared = b.sector_size, list(range(0, 24))  # every thread writes these
    written = {lba: set() for lba in range(100 + 60 * 8)}
    errors, lock = [], threading.Lock()
    nthreads, rounds = 8, 400 if durability != "strict" else 60

    def worker(t):
        rng = random.Random(t)
        own = list(range(100 + 60 * t, 100 + 60 * t + 60))
        try:
            for seq in range(rounds):
                lba = rng.choice(shared if rng.random() < 0.5 else own)
                n = rng.randint(1, 3) if lba in own else 1
                n = min(n, own[-1] + 1 - lba) if lba in own else 1
                data = b"".join(content(t, seq, lba + i, ss) for i in range(n))
                with lock:
                    for i in range(n):
                        written[lba + i].add(data[i * ss:(i + 1) * ss])
                b.write(lba, data, fua=rng.random() < 0.1)
                for r in range(2):  # reads must always see one whole version
                    rl = rng.choice(shared + own)
                    got = b.read(rl, 1)
                    head = got[:TAG]
                    if got != head * (ss // TAG):
                        errors.append(f"torn read of LBA {rl}: {got[:40]!r}")
                if rng.random() < 0.05:
                    b.flush()
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]

    def verify(btt):
        for lba, versions in written.items():
            if versions:
                assert btt.read(lba, 1) in versions, f"LBA {lba}"
        r = btt.check()
        assert r["clean"], r["problems"]

    verify(b)
    last = {lba: b.read(lba, 1) for lba in written if written[lba]}
    b.close()
    with Btt.open(tmpfile) as b2:  # the same data after close and reopen
        verify(b2)
        assert all(b2.read(lba, 1) == data for lba, data in last.items())


def test_writers_waiting_for_one_commit_do_not_commit_again(tmpfile):
    """16 writers run out of clean lanes together: the first commits, and the others, who
    wanted the same epoch committed, must not each commit the few writes staged since."""
    b = Btt.create(tmpfile, size=40 * MiB, durability="group")
    nthreads, per_thread = 16, 256  # 4096 distinct LBAs: no conflicts, 256 lanes per epoch
    buf = bytes(b.sector_size)
    before = b.stats()["commits"]

    def worker(t):
        for i in range(per_thread):
            b.write(t + nthreads * i, buf)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    commits = b.stats()["commits"] - before
    b.close()
    assert commits <= nthreads * per_thread // 256, commits
