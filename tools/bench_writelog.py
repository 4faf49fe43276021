#!/usr/bin/env python3
"""Cost of recording (log-writes=, docs/write-log.md): the same server, the same BTT, with
recording off and on, one after another, in one run; reported as ratios (on / off).

Over NBD: our nbdkit plugin (group durability) and fio's nbd engine, 4k random writes at
QD1 and QD16 and 4k random reads at QD16, alternating off/on runs `--rounds` times so that
drift of a shared machine hits both sides alike. The off runs are the server as users run
it: without log-writes= not one call of the recorder runs (the vtable is chosen at open).

Usage: tools/bench_writelog.py [--dir DIR] [--runtime S] [--rounds N] [--json OUT]
"""
import argparse
import os
import shutil
import sys
import tempfile

import bench  # tools/ is the script's directory

SIZE = 256 << 20
JOBS = [{"rw": "randwrite", "bs": "4k", "iodepth": 1},
        {"rw": "randwrite", "bs": "4k", "iodepth": 16},
        {"rw": "randread", "bs": "4k", "iodepth": 16}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the BTT and the logs go (a disk)")
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not shutil.which("fio", path=bench.ENV["PATH"]):
        print("bench_writelog: needs fio", file=sys.stderr)
        return 1
    sys.path.insert(0, bench.ROOT)
    from btt_core import Btt

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-writelog-") as d:
        region = os.path.join(d, "region.img")
        Btt.create(region, size=SIZE).close()
        with Btt.open(region, durability="none") as b:  # written once: no holes read
            buf = bytes(range(256)) * 16 * 256
            for lba in range(0, b.nlba - 256, 256):
                b.write(lba, buf)
        sock = os.path.join(d, "nbd.sock")
        results: dict = {}
        for n in range(args.rounds):
            for mode in ("off", "on"):
                log = os.path.join(d, f"writes-{n}.log")
                argv = ["nbdkit", "--foreground", "--unix", sock, "python", bench.PLUGIN,
                        f"region={region}", "durability=group",
                        *([f"log-writes={log}"] if mode == "on" else [])]
                p = bench.start(argv, sock)
                try:
                    for job in JOBS:
                        key = f"{job['rw']}-qd{job['iodepth']}"
                        r = bench.fio(sock, job, args.runtime, SIZE * 8 // 10, d)
                        results.setdefault(key, {"off": [], "on": []})[mode].append(r["iops"])
                finally:
                    bench.stop(p)
                if os.path.exists(log):
                    os.unlink(log)  # ours: created by this run's server
    out = {}
    for key, r in results.items():
        off, on = sum(r["off"]) / len(r["off"]), sum(r["on"]) / len(r["on"])
        out[key] = {"off_iops": round(off), "on_iops": round(on), "ratio": round(on / off, 3)}
        print(f"{key:16} off {off:9.0f} IOPS  on {on:9.0f} IOPS  on/off {on / off:.3f}")
    bench.emit({"bench_writelog": out}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
