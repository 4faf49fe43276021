#!/usr/bin/env python3
"""How long check-namespace takes on a 64 GiB sparse namespace with 4096-byte sectors
(issue target: under a minute). Usage: tools/bench_check.py [--dir DIR] [--size-gib N]"""
import argparse
import json
import os
import random
import tempfile
import time

from btt_core import Btt, check_namespace


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--size-gib", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "ns.img")
        with Btt.create(path, size=args.size_gib << 30, durability="none") as b:
            rng, block = random.Random(1), os.urandom(4096)
            for _ in range(20000):  # some real mappings, so the map is not all holes
                b.write(rng.randrange(b.nlba), block)
        for repair in (False, True):
            t = time.perf_counter()
            r = check_namespace(path, repair=repair)
            dt = time.perf_counter() - t
            print(json.dumps({"size_gib": args.size_gib, "repair": repair, "seconds": round(dt, 2),
                              "status": r["status"], "nlba": r["nlba"]}))


if __name__ == "__main__":
    main()
