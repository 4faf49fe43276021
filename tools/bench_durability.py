#!/usr/bin/env python3
"""Durability cost on a disk-backed file: fdatasync calls per write and 4k random-write IOPS
for durability=group|strict|none at queue depth 1 and 16, measured two ways on the same
fully written 1 GiB BTT:

* over NBD, as users run it: our nbdkit plugin (default thread model) and fio's nbd engine
  over a Unix socket; fdatasyncs are the engine's own count, read from the control socket
  (`list` with `stats` shows them for each served sector namespace) before and after each fio run;
* in process: threads calling the engine directly, each write one C call with the GIL
  released. Concurrent `strict` writers may share a commit here (as with
  threadmodel=parallel), which the serialized NBD server never does.

Usage: tools/bench_durability.py [--dir DIR] [--seconds S] [--json OUT] [--no-nbd]
"""
import argparse
import os
import random
import sys
import tempfile
import threading
import time

import bench  # tools/ is the script's directory

from btt_core import Btt

SIZE = 1 << 30
MODES = ("group", "strict", "none")


def _summary(stats: dict, before: dict, writes: int, iops: float) -> dict:
    syncs = stats["syncs"] - before["syncs"]
    return {"iops": round(iops), "writes": writes,
            "fdatasync_per_write": round(syncs / max(writes, 1), 4),
            "commits_per_write": round((stats["commits"] - before["commits"]) / max(writes, 1), 4)}


def run_in_process(path, durability, qd, seconds):
    b = Btt.open(path, durability=durability)
    b.start_timer(50)
    stop = time.perf_counter() + seconds
    counts = [0] * qd

    def worker(t):
        rng, buf = random.Random(t), os.urandom(4096)
        while time.perf_counter() < stop:
            b.write(rng.randrange(b.nlba), buf)
            counts[t] += 1

    before = b.stats()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(qd)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    after = b.stats()
    b.close()
    return _summary(after, before, sum(counts), sum(counts) / elapsed)


def run_nbd(path, durability, qd, seconds, workdir):
    from control.server import request

    sock, ctl = os.path.join(workdir, "s.sock"), os.path.join(workdir, "ctl.sock")
    p = bench.start(["nbdkit", "--foreground", "--unix", sock, "python", bench.PLUGIN,
                     f"region={path}", f"durability={durability}", f"control={ctl}"], sock)
    try:
        for _ in range(200):
            if os.path.exists(ctl):
                break
            time.sleep(0.05)

        def stats():
            (ns,) = request(ctl, {"op": "list", "stats": True})["result"]
            return ns["stats"]

        before = stats()
        r = bench.fio(sock, dict(rw="randwrite", bs="4k", iodepth=qd), seconds, SIZE, workdir)
        after = stats()
    finally:
        bench.stop(p)
    # The counts include fio's ramp-up second; IOPS are fio's, after the ramp.
    return _summary(after, before, after["writes"] - before["writes"], r["iops"])


def prepare(path):
    """A fully written BTT: no write allocates file blocks, so barriers flush data only."""
    block = os.urandom(1 << 20)
    with Btt.create(path, size=SIZE, durability="none") as b:
        per = (1 << 20) // b.sector_size
        for lba in range(0, b.nlba - per + 1, per):
            b.write(lba, block)
    os.sync()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".", help="a directory on a real disk (not tmpfs)")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--json")
    ap.add_argument("--no-nbd", action="store_true", help="in process only")
    args = ap.parse_args()
    sys.path.insert(0, bench.ROOT)
    results: dict[str, dict] = {"nbd": {}, "in_process": {}}
    with tempfile.TemporaryDirectory(dir=os.path.abspath(args.dir)) as d:
        path = os.path.join(d, "bench.img")
        prepare(path)
        for durability in MODES:
            for qd in (1, 16):
                key = f"{durability}_qd{qd}"
                if not args.no_nbd:
                    r = results["nbd"][key] = run_nbd(path, durability, qd, args.seconds, d)
                    print(f"nbd        {durability:6} QD{qd:<2} {r}", file=sys.stderr)
                r = results["in_process"][key] = run_in_process(path, durability, qd,
                                                                args.seconds)
                print(f"in process {durability:6} QD{qd:<2} {r}", file=sys.stderr)
    for how in ("nbd", "in_process"):
        for qd in (1, 16):
            if f"group_qd{qd}" in results[how]:
                results[how][f"group_vs_strict_iops_qd{qd}"] = round(
                    results[how][f"group_qd{qd}"]["iops"] /
                    max(results[how][f"strict_qd{qd}"]["iops"], 1), 2)
    bench.emit(results, args.json)


if __name__ == "__main__":
    main()
