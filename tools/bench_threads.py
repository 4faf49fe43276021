#!/usr/bin/env python3
"""Chooses the plugin's thread model by measurement: a 4k random 70/30 read/write mix at
QD16 against our BTT export (tmpfs; durability none unless told) under each nbdkit thread
model.

Usage: tools/bench_threads.py [--runtime S] [--durability none|group|strict] [--json OUT]
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ENV, PLUGIN, SIZE, emit, start, stop  # noqa: E402

CONFIGS = [("serialize_all", None), ("serialize_requests", None), ("parallel", 2),
           ("parallel", 4), ("parallel", 16)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--durability", choices=["none", "group", "strict"], default="none")
    ap.add_argument("--json")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from btt_core import Btt
    import subprocess
    results = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        region, sock = os.path.join(d, "btt.img"), os.path.join(d, "s.sock")
        with Btt.create(region, size=SIZE, durability="none") as b:
            block = os.urandom(1 << 20)
            for lba in range(0, b.nlba - 255, 256):
                b.write(lba, block)
        for model, threads in CONFIGS:
            argv = ["nbdkit", "--foreground", "--unix", sock,
                    *(["--threads", str(threads)] if threads else []), "python", PLUGIN,
                    f"region={region}", f"durability={args.durability}", f"threadmodel={model}"]
            p = start(argv, sock)
            try:
                out = os.path.join(d, "fio.json")
                subprocess.run(["fio", "--name=mix", "--ioengine=nbd",
                                f"--uri=nbd+unix:///?socket={sock}", "--rw=randrw",
                                "--rwmixread=70", "--bs=4k", "--iodepth=16", "--time_based",
                                f"--runtime={args.runtime}", "--ramp_time=1",
                                f"--size={SIZE * 9 // 10}", "--output-format=json",
                                f"--output={out}"], env=ENV, check=True, capture_output=True)
                with open(out) as f:
                    j = json.load(f)["jobs"][0]
            finally:
                stop(p)
            name = model + (f" --threads {threads}" if threads else "")
            results[name] = {"read_iops": round(j["read"]["iops"]),
                             "write_iops": round(j["write"]["iops"]),
                             "total_iops": round(j["read"]["iops"] + j["write"]["iops"])}
            print(f"{name:28} {results[name]}", file=sys.stderr)
    emit(results, args.json)


if __name__ == "__main__":
    main()
