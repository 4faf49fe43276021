#!/usr/bin/env python3
"""`make bench-shared`: our BTT export against nbdkit's `file` plugin, both serving a file on
a shared file system, in one run, as ratios (docs/scale-out.md, "Measured on GlusterFS").

By default it makes the single-node GlusterFS volume the tests use (tests/glusterfs.py:
replica 2 over two bricks in a temporary directory, FUSE-mounted; removed afterwards);
`--dir DIR` measures in a directory of a file system you mounted yourself (NFS, CephFS).
Both servers get a fully written 256 MiB file on it and run, alternating, `--rounds`
times (medians reported):

* randread 4k QD16, randwrite 4k QD16;
* fsync-heavy writes: randwrite 4k QD1 with a FLUSH after every write (fio --fsync=1).

Our server runs as `bttctl serve` starts it (durability=group, lease=auto: a lease file on
a shared file system). Results: JSON and markdown in docs/bench/ (--out), stdout.

Usage: tools/bench_shared.py [--dir DIR] [--runtime S] [--rounds N] [--out PREFIX]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import bench  # tools/ is the script's directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 256 << 20
JOBS = {
    "randread 4k QD16": dict(rw="randread", bs="4k", iodepth=16),
    "randwrite 4k QD16": dict(rw="randwrite", bs="4k", iodepth=16),
    "randwrite 4k QD1 + flush each": dict(rw="randwrite", bs="4k", iodepth=1, fsync=1),
}
SERVERS = ("nbdkit-file", "ours-btt-group")


def fio(sock: str, job: dict, runtime: float, workdir: str) -> dict:
    extra = [f"--fsync={job['fsync']}"] if job.get("fsync") else []
    out = os.path.join(workdir, "fio.json")
    argv = ["fio", "--name=j", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
            f"--rw={job['rw']}", f"--bs={job['bs']}", f"--iodepth={job['iodepth']}",
            "--time_based", f"--runtime={runtime}", "--ramp_time=1", f"--size={SIZE // 2}",
            "--output-format=json", f"--output={out}", *extra]
    subprocess.run(argv, env=bench.ENV, check=True, capture_output=True, cwd=workdir)
    with open(out) as f:
        j = json.load(f)["jobs"][0]
    side = j["read"] if "read" in job["rw"] else j["write"]
    return {"iops": side["iops"], "lat_us": side["lat_ns"]["mean"] / 1000}


def measure(dirpath: str, workdir: str, runtime: float, rounds: int) -> dict:
    raw, btt = bench.prepare(dirpath, SIZE)
    sock = os.path.join(workdir, "nbd.sock")
    nbdkit = ["nbdkit", "--foreground", "--unix", sock]
    argv = {"nbdkit-file": nbdkit + ["file", raw],
            "ours-btt-group": nbdkit + ["python", bench.PLUGIN, f"region={btt}",
                                        "durability=group"]}
    samples: dict[str, dict[str, list[dict]]] = {s: {j: [] for j in JOBS} for s in SERVERS}
    for r in range(rounds):
        order = SERVERS if r % 2 == 0 else tuple(reversed(SERVERS))
        for server in order:
            p = bench.start(argv[server], sock)
            try:
                for name, job in JOBS.items():
                    samples[server][name].append(fio(sock, job, runtime, workdir))
            finally:
                bench.stop(p)
    return {s: {j: {k: round(statistics.median(x[k] for x in v), 1) for k in v[0]}
                for j, v in jobs.items()} for s, jobs in samples.items()}


def markdown(res: dict, meta: dict) -> str:
    lines = [f"# Shared file system: BTT against nbdkit `file` ({meta['fs']})", "",
             f"Run {meta['when']} on {meta['machine']}; fio nbd engine over a Unix socket, "
             f"{meta['runtime']:g} s per job, median of {meta['rounds']} alternating rounds; "
             f"a fully written {SIZE >> 20} MiB file on the volume. IOPS (mean latency, µs).",
             "", "| job | nbdkit-file | ours-btt-group | BTT / file |", "|---|---|---|---|"]
    for job in JOBS:
        f, b = res["nbdkit-file"][job], res["ours-btt-group"][job]
        lines.append(f"| {job} | {f['iops']:.0f} ({f['lat_us']:.0f}) | {b['iops']:.0f} "
                     f"({b['lat_us']:.0f}) | {b['iops'] / f['iops']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="a directory on a shared file system you mounted "
                    "(default: a fresh single-node GlusterFS volume)")
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "shared"),
                    help="where to write the results: PREFIX plus .json and .md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as work:
        volume = None
        if args.dir:
            dirpath = args.dir
        else:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from glusterfs import Volume  # the volume the scale-out tests use
            volume = Volume(work).start()
            dirpath = volume.mounts[0]
        try:
            kind = bench_fs(dirpath)
            res = measure(dirpath, work, args.runtime, args.rounds)
        finally:
            if volume is not None:
                volume.stop()
    meta = {"fs": kind, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} vCPU {platform.machine()}, Linux {platform.release()}",
            "runtime": args.runtime, "rounds": args.rounds}
    out = {"meta": meta, "results": res,
           "ratios": {j: round(res["ours-btt-group"][j]["iops"] / res["nbdkit-file"][j]["iops"],
                               2) for j in JOBS}}
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=2)
    md = markdown(res, meta)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


def bench_fs(dirpath: str) -> str:
    sys.path.insert(0, ROOT)
    from nvdimm.lease import fs_type
    return fs_type(dirpath) or "unknown file system"


if __name__ == "__main__":
    sys.exit(main())
