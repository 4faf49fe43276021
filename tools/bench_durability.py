#!/usr/bin/env python3
"""Durability cost on a disk-backed file: fdatasync calls per write and 4k random-write IOPS
for durability=group|strict|none at queue depth 1 and 16 (threads calling the engine
directly, each write one C call with the GIL released). The NBD end-to-end version of
these figures is in tools/bench.py.

Usage: tools/bench_durability.py [--dir DIR] [--seconds S] [--json OUT]
"""
import argparse
import os
import random
import sys
import tempfile
import threading
import time

from bench import emit  # noqa: E402 (tools/ is the script's directory)
from btt_core import Btt

SIZE = 1 << 30


def run(path, durability, qd, seconds):
    b = Btt.open(path, durability=durability)
    b.start_timer(50)
    stop = time.perf_counter() + seconds
    counts = [0] * qd

    def worker(t):
        rng, buf = random.Random(t), os.urandom(4096)
        while time.perf_counter() < stop:
            b.write(rng.randrange(b.nlba), buf)
            counts[t] += 1

    start_stats = b.stats()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(qd)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    s = b.stats()
    b.close()
    writes = sum(counts)
    syncs = s["syncs"] - start_stats["syncs"]
    return {"iops": round(writes / elapsed), "writes": writes,
            "fdatasync_per_write": round(syncs / max(writes, 1), 4),
            "commits_per_write": round((s["commits"] - start_stats["commits"]) / max(writes, 1), 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".", help="a directory on a real disk (not tmpfs)")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "bench.img")
        Btt.create(path, size=SIZE).close()
        results = {}
        for durability in ("group", "strict", "none"):
            for qd in (1, 16):
                r = run(path, durability, qd, args.seconds)
                results[f"{durability}_qd{qd}"] = r
                print(f"{durability:6} QD{qd:<2} {r}", file=sys.stderr)
    for qd in (1, 16):
        results[f"group_vs_strict_iops_qd{qd}"] = round(
            results[f"group_qd{qd}"]["iops"] / max(results[f"strict_qd{qd}"]["iops"], 1), 1)
    emit(results, args.json)


if __name__ == "__main__":
    main()
