#!/usr/bin/env python3
"""Scale figures for the engine: create and open a 1 TiB BTT on a sparse file, the memory
it takes, and 4k random-read rate compared with a 1 GiB BTT (in process, no NBD).

Each measurement runs in a fresh child process so its peak RSS is its own.
Usage: tools/bench_scale.py [--dir DIR] [--json OUT]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench import emit  # tools/ is the script's directory

CHILD = r"""
import json, os, random, resource, sys, time
from btt_core import Btt
what, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
if what == "create":
    t = time.perf_counter()
    Btt.create(path, size=size, durability="none").close()
    out["seconds"] = time.perf_counter() - t
else:
    t = time.perf_counter()
    b = Btt.open(path, durability="none")
    out["open_seconds"] = time.perf_counter() - t
    rng, buf, n = random.Random(1), bytearray(b.sector_size), 0
    t = time.perf_counter()
    while time.perf_counter() - t < 3:
        for _ in range(1000):
            b.readinto(rng.randrange(b.nlba), buf)
        n += 1000
    out["randread_iops"] = n / (time.perf_counter() - t)
    b.close()
out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def child(what, path, size):
    p = subprocess.run([sys.executable, "-c", CHILD, what, path, str(size)], check=True,
                       capture_output=True, text=True)
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the sparse files go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for name, size in (("1GiB", 1 << 30), ("1TiB", 1 << 40)):
            path = os.path.join(d, name + ".img")
            c = child("create", path, size)
            o = child("open", path, size)
            results[name] = {"create_seconds": round(c["seconds"], 3),
                             "create_maxrss_mib": round(c["maxrss_mib"], 1),
                             "open_seconds": round(o["open_seconds"], 4),
                             "open_and_read_maxrss_mib": round(o["maxrss_mib"], 1),
                             "randread_4k_iops": round(o["randread_iops"]),
                             "allocated_mib": round(os.stat(path).st_blocks * 512 / 2**20, 1)}
            print(f"{name}: {results[name]}", file=sys.stderr)
    results["randread_ratio_1TiB_vs_1GiB"] = round(
        results["1TiB"]["randread_4k_iops"] / results["1GiB"]["randread_4k_iops"], 3)
    emit(results, args.json)


if __name__ == "__main__":
    main()
