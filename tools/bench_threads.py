#!/usr/bin/env python3
"""Chooses the plugin's thread model by measurement (docs/serving.md, issue 13).

For each nbdkit thread model (and worker count under parallel), against a 1 GiB BTT
export and nbdkit's file plugin on the same machine, 4k random I/O through fio's nbd engine:

* tmpfs, durability=none (CPU-bound): randread and randwrite on one connection at QD16,
  and randread on four connections at QD8;
* disk (--disk-dir), durability=strict: randread at QD16 right after dropping the page
  cache (every read waits on the disk), and randwrite at QD16 (every write waits on a
  commit).

Usage: tools/bench_threads.py [--runtime S] [--rounds N] [--disk-dir DIR] [--json OUT]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ENV, PLUGIN, ROOT, SIZE, emit, start, stop, warm  # noqa: E402

CONFIGS = [("serialize_all", None), ("serialize_requests", None), ("parallel", 2),
           ("parallel", 4), ("parallel", 8), ("parallel", 16)]


def fio(sock: str, rw: str, iodepth: int, numjobs: int, runtime: float, out: str) -> float:
    subprocess.run(["fio", "--name=j", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                    f"--rw={rw}", "--bs=4k", f"--iodepth={iodepth}", f"--numjobs={numjobs}",
                    "--group_reporting", "--time_based", f"--runtime={runtime}",
                    "--ramp_time=1", f"--size={SIZE * 9 // 10}", "--output-format=json",
                    f"--output={out}"], env=ENV, check=True, capture_output=True)
    with open(out) as f:
        j = json.load(f)["jobs"][0]
    return round(j["read"]["iops"] + j["write"]["iops"])


def filled_btt(path: str) -> None:
    from btt_core import Btt
    block = os.urandom(1 << 20)
    with Btt.create(path, size=SIZE, durability="none") as b:
        for lba in range(0, b.nlba - 255, 256):
            b.write(lba, block)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        print("cannot drop the page cache (not root?): cold reads are warm", file=sys.stderr)


def argv_for(name: str, threads, sock: str, region: str, raw: str, durability: str):
    nbdkit = ["nbdkit", "--foreground", "--unix", sock]
    if name == "nbdkit-file":
        return nbdkit + ["file", raw]
    return (nbdkit + (["--threads", str(threads)] if threads else []) +
            ["python", PLUGIN, f"region={region}", f"durability={durability}",
             f"threadmodel={name}"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--disk-dir", default=os.path.join(ROOT, "var"))
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    os.makedirs(args.disk_dir, exist_ok=True)
    results: dict[str, dict[str, list[float]]] = {}
    configs = CONFIGS + [("nbdkit-file", None)]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm, \
            tempfile.TemporaryDirectory(dir=args.disk_dir) as disk:
        for d in (shm, disk):
            filled_btt(os.path.join(d, "btt.img"))
            with open(os.path.join(d, "raw.img"), "wb") as f:
                f.truncate(SIZE)
        out = os.path.join(shm, "fio.json")
        for rnd in range(args.rounds):
            for name, threads in configs:
                label = name + (f" --threads {threads}" if threads else "")
                r = results.setdefault(label, {})
                sock = os.path.join(shm, "s.sock")
                btt, raw = os.path.join(shm, "btt.img"), os.path.join(shm, "raw.img")
                warm(raw if name == "nbdkit-file" else btt)
                p = start(argv_for(name, threads, sock, btt, raw, "none"), sock)
                try:
                    for job, spec in (("tmpfs randread 1x16", ("randread", 16, 1)),
                                      ("tmpfs randwrite 1x16", ("randwrite", 16, 1)),
                                      ("tmpfs randread 4x8", ("randread", 8, 4))):
                        r.setdefault(job, []).append(fio(sock, *spec, args.runtime, out))
                finally:
                    stop(p)
                if name == "nbdkit-file":
                    continue
                btt = os.path.join(disk, "btt.img")
                p = start(argv_for(name, threads, sock, btt, raw, "strict"), sock)
                try:
                    drop_caches()
                    r.setdefault("disk cold randread QD16", []).append(
                        fio(sock, "randread", 16, 1, args.runtime, out))
                    r.setdefault("disk strict randwrite QD16", []).append(
                        fio(sock, "randwrite", 16, 1, args.runtime, out))
                finally:
                    stop(p)
                print(f"[{rnd + 1}/{args.rounds}] {label:28} "
                      f"{ {k: v[-1] for k, v in r.items()} }", file=sys.stderr)
    emit(results, args.json)


if __name__ == "__main__":
    main()
