#!/usr/bin/env python3
"""`make bench`: our exports against reference servers, in one run, over Unix sockets.

Servers (same data, same machine, one after another): nbdkit's `file` plugin (C), a plain
Python pass-through plugin with our thread model (tools/passthrough_plugin.py), the same
pass-through keeping its thread state per connection as our plugin does, qemu-nbd,
our raw export, and our BTT export with durability none, group and strict. Each runs the
fio matrix below on a backing file on tmpfs and on a disk-backed directory. Results: JSON,
a markdown table with ratios, a PNG chart (when matplotlib is present), written to
docs/benchmarks.md and docs/bench/. Machines here are noisy: compare ratios within a run,
and use --rounds to alternate the servers several times (medians are reported).

Every server starts from a fully cached backing file (it is read once first): these VMs
page out file pages idle for about a minute (DAMON reclaim), so without that the servers
measured late in a run read a colder file than the early ones, and a disk-backed BTT,
measured after four other servers, was mostly read from the disk.

Our servers run as `bttctl serve` starts them (the default thread model, serialize_requests:
every connection at once); `ours-btt-none-serialize_all` is the model before issue 13. A
noisy-neighbour run (two namespaces of one server, one reading, one writing with fsync; the
same two in separate servers, and the CPU each keeps busy alone) and a
sparse copy (nbdcopy of a 1 TiB namespace holding 1 GiB, with block status and without)
close the run.

Usage: tools/bench.py [--runtime S] [--repeat N] [--rounds N] [--quick] [--only SERVER,...]
                      [--jobs JOB,...] [--no-tmpfs] [--no-disk] [--no-scale] [--no-neighbour]
                      [--no-sparse] [--sparse-cap S] [--plugin PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "plugin", "nbdkit_btt.py")
PASSTHROUGH = os.path.join(ROOT, "tools", "passthrough_plugin.py")
SIZE = 1 << 30
ENV = dict(os.environ, PATH="/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", ""))

JOBS = {
    "randread 4k QD1": dict(rw="randread", bs="4k", iodepth=1),
    "randread 4k QD16": dict(rw="randread", bs="4k", iodepth=16),
    "randwrite 4k QD1": dict(rw="randwrite", bs="4k", iodepth=1),
    "randwrite 4k QD16": dict(rw="randwrite", bs="4k", iodepth=16),
    "read 128k QD4": dict(rw="read", bs="128k", iodepth=4),
    "write 128k QD4": dict(rw="write", bs="128k", iodepth=4),
    "randread 4k QD16 2conn": dict(rw="randread", bs="4k", iodepth=16, numjobs=2),
    "randread 4k QD8 4conn": dict(rw="randread", bs="4k", iodepth=8, numjobs=4),
}


def servers(raw: str, btt: str, sock: str, threadmodel: str,
            plugin: str = PLUGIN) -> dict[str, list[str]]:
    nbdkit = ["nbdkit", "--foreground", "--unix", sock]
    ours = nbdkit  # the plugin's default thread model, as `bttctl serve` starts it
    return {
        "nbdkit-file": nbdkit + ["file", raw],
        "python-passthrough": nbdkit + ["python", PASSTHROUGH, f"file={raw}",
                                        f"threadmodel={threadmodel}"],
        "python-passthrough-kept-tstate": nbdkit + ["python", PASSTHROUGH, f"file={raw}",
                                                    f"threadmodel={threadmodel}",
                                                    "keep-thread-state=on"],
        "qemu-nbd": ["qemu-nbd", "--socket", sock, "--format", "raw", "--persistent",
                     "--shared", "8", "--cache", "writeback", raw],
        "ours-raw": ours + ["python", plugin, f"region={raw}"],
        "ours-btt-none": ours + ["python", plugin, f"region={btt}", "durability=none"],
        # The thread model before issue 13, for its no-regression target.
        "ours-btt-none-serialize_all": nbdkit + ["python", plugin, f"region={btt}",
                                                 "durability=none", "threadmodel=serialize_all"],
        "ours-btt-group": ours + ["python", plugin, f"region={btt}", "durability=group"],
        "ours-btt-strict": ours + ["python", plugin, f"region={btt}", "durability=strict"],
    }


def emit(results: dict, path: str | None) -> None:
    """Prints results as JSON on stdout and, when asked, keeps them in a file."""
    print(json.dumps(results, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def cached_fraction(path: str) -> float | None:
    """How much of path is in the page cache (util-linux fincore), or None."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                             capture_output=True, text=True, check=True).stdout
        return round(int(out.split()[0]) / max(os.path.getsize(path), 1), 3)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def warm(path: str) -> None:
    """Reads path once, so that the server about to start finds it all in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def start(argv: list[str], sock: str) -> subprocess.Popen:
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while not os.path.exists(sock):
        if p.poll() is not None or time.time() > deadline:
            err = "timeout"
            if p.poll() is not None and p.stderr is not None:
                err = p.stderr.read().decode(errors="replace")
            raise RuntimeError(f"{argv[0]} did not start: {err[-2000:]}")
        time.sleep(0.05)
    return p


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fio(sock: str, job: dict, runtime: float, size: int, workdir: str) -> dict:
    out = os.path.join(workdir, "fio.json")
    argv = ["fio", "--name=j", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
            f"--rw={job['rw']}", f"--bs={job['bs']}", f"--iodepth={job['iodepth']}",
            f"--numjobs={job.get('numjobs', 1)}", "--group_reporting", "--time_based",
            f"--runtime={runtime}", "--ramp_time=1", f"--size={size}",
            "--output-format=json", f"--output={out}"]
    subprocess.run(argv, env=ENV, check=True, capture_output=True, cwd=workdir)
    with open(out) as f:
        j = json.load(f)["jobs"][0]
    side = j["read"] if "read" in job["rw"] else j["write"]
    return {"iops": side["iops"], "bw_MBps": side["bw_bytes"] / 1e6,
            "lat_us": side["lat_ns"]["mean"] / 1000}


def prepare(dirpath: str, size: int = SIZE) -> tuple[str, str]:
    """A raw file and a BTT region of size bytes (1 GiB), both fully written (no holes
    read) and synced."""
    sys.path.insert(0, ROOT)
    from btt_core import Btt
    raw, btt = os.path.join(dirpath, "raw.img"), os.path.join(dirpath, "btt.img")
    block = os.urandom(1 << 20)
    with open(raw, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    with Btt.create(btt, size=size, durability="none") as b:
        per = (1 << 20) // b.sector_size
        for lba in range(0, b.nlba - per + 1, per):
            b.write(lba, block)
    os.sync()  # no writeback of the preparation may compete with the first measurement
    return raw, btt


def run_matrix(where: str, dirpath: str, args) -> dict:
    raw, btt = prepare(dirpath)
    sock = os.path.join(dirpath, "s.sock")
    argvs = servers(raw, btt, sock, args.threadmodel, args.plugin)
    names = [n for n in argvs if not args.only or n in args.only]
    jobs = {j: JOBS[j] for j in (args.jobs or JOBS)}
    runs: dict[str, dict[str, list[dict]]] = {n: {j: [] for j in jobs} for n in names}
    extra: dict[str, dict[str, list]] = {
        n: {"rss_mib": [], "page_cache_before_warm": []} for n in names}
    for rnd in range(args.rounds):
        for name in names:
            backing = btt if "btt" in name else raw
            size = os.path.getsize(raw) if "btt" not in name else None
            os.sync()  # the previous server's dirty pages are not this one's writeback to pay
            extra[name]["page_cache_before_warm"].append(cached_fraction(backing))
            warm(backing)
            p = start(argvs[name], sock)
            try:
                for job_name, job in jobs.items():
                    for _ in range(args.repeat):
                        r = fio(sock, job, args.runtime, (size or SIZE) * 9 // 10, dirpath)
                        runs[name][job_name].append(r)
                    print(f"  [{where} {rnd + 1}/{args.rounds}] {name:20} {job_name:24} "
                          f"{r['iops']:10.0f} IOPS {r['lat_us']:8.1f} us", file=sys.stderr)
                extra[name]["rss_mib"].append(rss_mib(p.pid))
            finally:
                stop(p)
    results = {}
    for name in names:
        res: dict[str, object] = {j: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for j, rs in runs[name].items()}
        res["rss_mib"] = max(extra[name]["rss_mib"])
        res["page_cache_before_warm"] = extra[name]["page_cache_before_warm"]
        results[name] = res
    return results


NEIGHBOUR_SIZE = 512 << 20


def _fio_one(uri: str, rw: str, iodepth: int, runtime: float, out: str, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
         f"--iodepth={iodepth}", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
         f"--size={NEIGHBOUR_SIZE * 3 // 4}", "--output-format=json", f"--output={out}",
         *extra], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _iops(out: str) -> float:
    with open(out) as f:
        j = json.load(f)["jobs"][0]
    return j["read"]["iops"] + j["write"]["iops"]


def _busy_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def _cpu_share_while(proc: subprocess.Popen, skip: float, window: float) -> float:
    """Fraction of the machine's CPU time busy during `window` seconds of proc's run."""
    time.sleep(skip)
    b0, t0 = _busy_cpu()
    time.sleep(window)
    b1, t1 = _busy_cpu()
    proc.wait()
    return (b1 - b0) / max(t1 - t0, 1)


def neighbour(args) -> dict:
    """Issue 13's noisy neighbour, backing files on disk: namespace `a` is read (4k random,
    QD4) alone, then again while namespace `b` does 4k random writes at QD1 with an fsync
    after each; and `b` alone, with the share of the machine's CPU it keeps busy.

    Servers: ours (a labelled region holding both, served as `bttctl serve` does, and under
    serialize_all, the model before issue 13); nbdkit's file plugin serving two files; and
    `ours-separate-servers`, a and b each in a region of its own served by a process of its
    own, which shares nothing with the neighbour but the machine. What a loses there is what
    the machine loses, not what the server does: the floor that isolation inside one server
    cannot beat."""
    bttctl = os.path.join(ROOT, ".venv", "bin", "bttctl")
    runs: dict[str, list[dict]] = {}

    def region_with(path: str, size: str, *names: str) -> None:
        subprocess.run([bttctl, "create-region", path, "-s", size], env=ENV, check=True,
                       capture_output=True)
        for name in names:
            subprocess.run([bttctl, "create-namespace", "--region", path, "-m", "sector",
                            "-s", "512M", "-n", name], env=ENV, check=True,
                           capture_output=True)

    with tempfile.TemporaryDirectory(dir=args.disk_dir) as d:
        region, sock, sock_b = (os.path.join(d, n) for n in ("region.img", "s.sock", "b.sock"))
        region_a, region_b = os.path.join(d, "a.img"), os.path.join(d, "b.img")
        region_with(region, "1100M", "a", "b")
        region_with(region_a, "600M", "a")
        region_with(region_b, "600M", "b")
        files = os.path.join(d, "files")
        os.mkdir(files)
        block = os.urandom(1 << 20)
        for name in ("a.img", "b.img"):
            with open(os.path.join(files, name), "wb") as f:
                for _ in range(NEIGHBOUR_SIZE >> 20):
                    f.write(block)
        nbdkit = ["nbdkit", "--foreground", "--unix"]
        ours = ["python", args.plugin]
        uri = "nbd+unix:///{}?socket={}"
        # name: ([(argv, socket)], a's uri, b's uri, file to warm; a BTT region file is
        # first filled through a, so that a reads data, not holes)
        configs = {
            "ours": ([(nbdkit + [sock] + ours + [f"region={region}"], sock)],
                     uri.format("a", sock), uri.format("b", sock), region),
            "ours-serialize_all": ([(nbdkit + [sock] + ours + [f"region={region}",
                                                              "threadmodel=serialize_all"],
                                     sock)],
                                   uri.format("a", sock), uri.format("b", sock), region),
            "ours-separate-servers": ([(nbdkit + [sock] + ours + [f"region={region_a}"], sock),
                                       (nbdkit + [sock_b] + ours + [f"region={region_b}"],
                                        sock_b)],
                                      uri.format("a", sock), uri.format("b", sock_b),
                                      region_a),
            "nbdkit-file": ([(nbdkit + [sock, "file", f"dir={files}"], sock)],
                            uri.format("a.img", sock), uri.format("b.img", sock),
                            os.path.join(files, "a.img")),
        }
        filled: set[str] = set()
        for rnd in range(args.rounds):
            for name, (servers_, a, b, warm_path) in configs.items():
                procs = []
                try:
                    for argv, s in servers_:
                        procs.append(start(argv, s))
                    if name != "nbdkit-file" and warm_path not in filled:
                        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={a}",
                                        "--rw=write", "--bs=1M", "--iodepth=4",
                                        f"--size={NEIGHBOUR_SIZE * 3 // 4}"],
                                       env=ENV, check=True, capture_output=True)
                        filled.add(warm_path)
                    warm(warm_path)
                    alone, busy, nb = (os.path.join(d, n + ".json")
                                       for n in ("alone", "busy", "nb"))
                    a_cpu = _cpu_share_while(_fio_one(a, "randread", 4, args.runtime, alone),
                                             1.5, max(args.runtime - 1, 1))
                    b_cpu = _cpu_share_while(
                        _fio_one(b, "randwrite", 1, args.runtime, nb, "--fsync=1"),
                        1.5, max(args.runtime - 1, 1))
                    r = {"a_alone": _iops(alone), "a_alone_cpu": a_cpu,
                         "neighbour_alone": _iops(nb),
                         "neighbour_alone_cpu": b_cpu}
                    noisy = _fio_one(b, "randwrite", 1, args.runtime + 2, nb, "--fsync=1")
                    time.sleep(0.5)
                    _fio_one(a, "randread", 4, args.runtime, busy).wait()
                    noisy.wait()
                    r |= {"a_with_neighbour": _iops(busy), "neighbour": _iops(nb)}
                    r["ratio"] = r["a_with_neighbour"] / r["a_alone"]
                    runs.setdefault(name, []).append(r)
                    print(f"  [neighbour {rnd + 1}/{args.rounds}] {name:22} "
                          f"{ {k: round(v, 2) for k, v in r.items()} }", file=sys.stderr)
                finally:
                    for p in procs:
                        stop(p)
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}
            for name, rs in runs.items()}


def scale(args) -> dict:
    """1 TiB vs 1 GiB BTT namespaces through NBD: start-up, server RSS, 4k random reads.
    The two sizes alternate over --rounds (medians): single 5 s runs here wander by ±15%."""
    sys.path.insert(0, ROOT)
    from btt_core import Btt
    sizes = (("1GiB", 1 << 30), ("1TiB", 1 << 40))
    runs: dict[str, list] = {label: [] for label, _ in sizes}
    with tempfile.TemporaryDirectory(dir=args.disk_dir) as d:
        for label, size in sizes:
            Btt.create(os.path.join(d, label + ".img"), size=size, durability="none").close()
        sock = os.path.join(d, "s.sock")
        for rnd in range(args.rounds):
            for label, size in sizes:
                t = time.perf_counter()
                p = start(["nbdkit", "--foreground", "--unix", sock, "python", args.plugin,
                           f"region={os.path.join(d, label + '.img')}", "durability=none"], sock)
                ready = time.perf_counter() - t
                try:
                    r = fio(sock, JOBS["randread 4k QD16"], args.runtime, size, d)
                    runs[label].append({"server_ready_s": round(ready, 3),
                                        "rss_mib": round(rss_mib(p.pid), 1),
                                        "randread_4k_qd16_iops": round(r["iops"])})
                finally:
                    stop(p)
                print(f"  [scale {rnd + 1}/{args.rounds}] {label}: {runs[label][-1]}",
                      file=sys.stderr)
    out = {label: {"server_ready_s": max(r["server_ready_s"] for r in rs),
                   "rss_mib": max(r["rss_mib"] for r in rs),
                   "randread_4k_qd16_iops": round(statistics.median(
                       r["randread_4k_qd16_iops"] for r in rs)),
                   "runs": rs} for label, rs in runs.items()}
    out["iops_ratio_1TiB_vs_1GiB"] = round(out["1TiB"]["randread_4k_qd16_iops"] /
                                           out["1GiB"]["randread_4k_qd16_iops"], 3)
    return out


SPARSE_SIZE, SPARSE_DATA = 1 << 40, 1 << 30


def _stats_read_bytes(path: str) -> int:
    """Bytes clients read, from nbdkit's stats filter ("read: N ops, T s, 1.00 GiB, ...")."""
    units = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    with open(path) as f:
        for line in f:
            if line.startswith("read:"):
                value, unit = line.split(",")[2].split()
                return round(float(value) * units[unit])
    return 0


def sparse_copy(args) -> dict:
    """Issue 15: nbdcopy to null: of a 1 TiB BTT namespace holding 1 GiB (eight 128 MiB
    runs), served with block status and with it disabled (nbdkit's noextents filter). The
    copy without it reads every byte of the terabyte: it is stopped after --sparse-cap
    seconds and its time projected from the bytes it read by then."""
    sys.path.insert(0, ROOT)
    from btt_core import Btt
    out: dict = {}
    with tempfile.TemporaryDirectory(dir=args.disk_dir) as d:
        img, sock, stats = (os.path.join(d, n) for n in ("sparse.img", "s.sock", "stats.txt"))
        b = Btt.create(img, size=SPARSE_SIZE, durability="none")
        chunk, run = os.urandom(32 << 20), SPARSE_DATA // 8
        step = b.size // 8 // run * run
        for i in range(8):
            for k in range(0, run, len(chunk)):
                b.pwrite(chunk, i * step + k)
        b.close()
        for label, filters in (("extents", []), ("no extents", ["--filter=noextents"])):
            p = start(["nbdkit", "--foreground", "--unix", sock, "--filter=stats", *filters,
                       "python", args.plugin, f"region={img}", "durability=none",
                       f"statsfile={stats}"], sock)
            t = time.perf_counter()
            try:
                subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"], env=ENV,
                               check=True, capture_output=True, timeout=args.sparse_cap)
                done = True
            except subprocess.TimeoutExpired:
                done = False
            elapsed = time.perf_counter() - t
            stop(p)
            read = _stats_read_bytes(stats)
            out[label] = {"finished": done, "seconds": round(elapsed, 2), "bytes_read": read,
                          "seconds_projected": round(elapsed if done else
                                                     elapsed * SPARSE_SIZE / max(read, 1), 2)}
            print(f"  [sparse copy] {label}: {out[label]}", file=sys.stderr)
    on, off = out["extents"], out["no extents"]
    out["read_ratio"] = round(on["bytes_read"] / SPARSE_SIZE, 5)
    out["time_ratio"] = round(on["seconds_projected"] / max(off["seconds_projected"], 1e-9), 4)
    return out


def ratio(results, server, ref, job, key="iops"):
    try:
        return results[server][job][key] / results[ref][job][key]
    except (KeyError, ZeroDivisionError):
        return None


def markdown(all_results: dict, scale_res: dict | None, args,
             neighbour_res: dict | None = None, sparse_res: dict | None = None) -> str:
    lines = ["# Benchmarks", "",
             f"Latest `make bench` run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} vCPU {platform.processor() or platform.machine()}, "
             f"{_cpu_model()}, Linux {platform.release()}; fio runtime {args.runtime} s, "
             f"median of {args.repeat} x {args.rounds} round(s), servers alternating; thread "
             f"model {args.threadmodel}; each server starts from a fully cached backing file. "
             "IOPS (128k rows: MB/s).",
             ""]
    for where, results in all_results.items():
        servers_ = list(results)
        lines += [f"## Backing file on {where}", "",
                  "| job | " + " | ".join(servers_) + " |",
                  "|---|" + "---|" * len(servers_)]
        for job in _jobs(results):
            key = "bw_MBps" if "128k" in job else "iops"
            cells = [f"{results[s][job][key]:.0f}" for s in servers_]
            lines.append(f"| {job} | " + " | ".join(cells) + " |")
        lines.append("| server RSS (MiB) | " + " | ".join(f"{results[s]['rss_mib']:.0f}"
                                                         for s in servers_) + " |")
        lines.append("| page cache before warming | " + " | ".join(
            "/".join(f"{f:.0%}" if f is not None else "?" for f in
                     results[s].get("page_cache_before_warm", [])) for s in servers_) + " |")
        lines += ["", "Ratios (targets from issue 7):", ""]
        checks = [
            ("BTT randread 4k QD16 / python-passthrough (>= 0.9)", "ours-btt-none",
             "python-passthrough", "randread 4k QD16", "iops", 0.9, True),
            ("BTT randread 4k QD16 / qemu-nbd (>= 1.0)", "ours-btt-none", "qemu-nbd",
             "randread 4k QD16", "iops", 1.0, True),
            ("BTT(none) randwrite 4k QD16 / python-passthrough (>= 0.8)", "ours-btt-none",
             "python-passthrough", "randwrite 4k QD16", "iops", 0.8, True),
            ("BTT read QD1 latency / python-passthrough (<= 1.15)", "ours-btt-none",
             "python-passthrough", "randread 4k QD1", "lat_us", 1.15, False),
            ("BTT(none) write QD1 latency / python-passthrough (<= 1.15)", "ours-btt-none",
             "python-passthrough", "randwrite 4k QD1", "lat_us", 1.15, False),
            ("group / strict randwrite 4k QD16", "ours-btt-group", "ours-btt-strict",
             "randwrite 4k QD16", "iops", None, True),
            # Issue 13: connections served at once, without losing what one connection had.
            ("BTT randread 4k QD8 x 4 connections / nbdkit-file (>= 0.8)", "ours-btt-none",
             "nbdkit-file", "randread 4k QD8 4conn", "iops", 0.8, True),
            ("BTT randread 4k QD16 / same under serialize_all (>= 0.95)", "ours-btt-none",
             "ours-btt-none-serialize_all", "randread 4k QD16", "iops", 0.95, True),
            ("BTT(none) randwrite 4k QD16 / same under serialize_all (>= 0.95)",
             "ours-btt-none", "ours-btt-none-serialize_all", "randwrite 4k QD16", "iops",
             0.95, True),
            # No targets: how we compare with a pass-through that keeps its thread state too.
            ("BTT randread 4k QD16 / python-passthrough-kept-tstate", "ours-btt-none",
             "python-passthrough-kept-tstate", "randread 4k QD16", "iops", None, True),
            ("BTT(none) randwrite 4k QD16 / python-passthrough-kept-tstate", "ours-btt-none",
             "python-passthrough-kept-tstate", "randwrite 4k QD16", "iops", None, True),
            ("BTT read QD1 latency / python-passthrough-kept-tstate", "ours-btt-none",
             "python-passthrough-kept-tstate", "randread 4k QD1", "lat_us", None, False),
            ("BTT(none) write QD1 latency / python-passthrough-kept-tstate", "ours-btt-none",
             "python-passthrough-kept-tstate", "randwrite 4k QD1", "lat_us", None, False),
        ]
        for text, s, ref, job, key, target, higher in checks:
            r = ratio(results, s, ref, job, key)
            if r is None:
                continue
            ok = "" if target is None else (" — met" if (r >= target if higher else r <= target)
                                            else " — **not met**")
            lines.append(f"* {text}: {r:.2f}{ok}")
        lines.append("")
    if neighbour_res:
        lines += ["## Noisy neighbour (issue 13; backing files on disk)", "",
                  "`a`: randread 4k QD4, alone and while `b` does randwrite 4k QD1 with "
                  "`--fsync=1`; `b` alone. CPU: the share of the machine's CPU time (all "
                  "cores, /proc/stat, iowait counted idle) busy while a or b runs alone. "
                  "`ours-separate-servers`: a and b in regions of their own, each served by "
                  "a process of its own, sharing only the machine. Medians over the rounds.",
                  "", "| server | a alone (IOPS) | CPU, a alone | a with neighbour (IOPS) "
                  "| ratio (target >= 0.8) | b alone (IOPS) | CPU, b alone | b with a (IOPS) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in neighbour_res.items():
            lines.append(f"| {name} | {r['a_alone']:.0f} | {r['a_alone_cpu']:.0%} | "
                         f"{r['a_with_neighbour']:.0f} | {r['ratio']:.2f} | "
                         f"{r['neighbour_alone']:.0f} | {r['neighbour_alone_cpu']:.0%} | "
                         f"{r['neighbour']:.0f} |")
        ours, apart = neighbour_res.get("ours"), neighbour_res.get("ours-separate-servers")
        if ours and apart:
            lines += ["", f"* One server / separate servers (isolation inside the server; 1.0 = "
                          f"as isolated as two processes): {ours['ratio'] / apart['ratio']:.2f}"]
        # CPU time is additive at best: with b taking its share, a can have only what is
        # left, so it keeps at most (1 - b's share) / (a's share) of its rate; less once
        # the two also contend for caches, wake-ups and the file system.
        lines += [f"* CPU ceiling for {name}: a alone keeps {r['a_alone_cpu']:.0%} of the CPU "
                  f"busy, b alone {r['neighbour_alone_cpu']:.0%}, so a keeps at most "
                  f"{min(1.0, (1 - r['neighbour_alone_cpu']) / r['a_alone_cpu']):.2f} of its "
                  f"rate with b beside it" for name, r in neighbour_res.items()
                  if name in ("ours", "ours-separate-servers", "nbdkit-file")
                  and r["a_alone_cpu"] > 0]
        lines.append("")
    if scale_res:
        lines += ["## 1 TiB namespace vs 1 GiB (sparse, disk-backed, durability none)", "",
                  f"Sizes alternated over {args.rounds} round(s): slowest start-up, largest "
                  "RSS, median IOPS.", "",
                  "| namespace | server ready (s) | server RSS (MiB) | randread 4k QD16 IOPS |",
                  "|---|---|---|---|"]
        for label in ("1GiB", "1TiB"):
            r = scale_res[label]
            lines.append(f"| {label} | {r['server_ready_s']} | {r['rss_mib']} | "
                         f"{r['randread_4k_qd16_iops']} |")
        lines += ["", f"IOPS ratio 1 TiB / 1 GiB: {scale_res['iops_ratio_1TiB_vs_1GiB']} "
                  "(target: within 10%)", ""]
    if sparse_res:
        on, off = sparse_res["extents"], sparse_res["no extents"]
        lines += ["## Sparse copy: block status (issue 15; disk-backed, durability none)", "",
                  "`nbdcopy URI null:` of a 1 TiB BTT namespace holding 1 GiB. Without block "
                  "status (nbdkit's noextents filter) the copy reads the whole terabyte; it "
                  f"is stopped after {args.sparse_cap:g} s and its time projected from what "
                  "it read.", "",
                  "| served | bytes read | time (s) |", "|---|---|---|",
                  f"| with block status | {on['bytes_read'] / (1 << 30):.2f} GiB | "
                  f"{on['seconds']} |",
                  f"| without (noextents) | {off['bytes_read'] / (1 << 30):.2f} GiB in "
                  f"{off['seconds']} s | {off['seconds_projected']} (projected) |", "",
                  f"Bytes read with block status / namespace size: {sparse_res['read_ratio']}; "
                  f"time ratio: {sparse_res['time_ratio']}.", ""]
    json_name, png_name = (args.name, args.name) if args.name else ("latest", "chart")
    chart_note = f"; chart: `docs/bench/{png_name}.png`" if all_results else ""
    lines += [f"Raw data: `docs/bench/{json_name}.json`{chart_note}.", ""]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _jobs(results: dict) -> list[str]:
    """The jobs of JOBS that every server in results ran (--jobs may pick a subset)."""
    return [j for j in JOBS if all(j in r for r in results.values())]


def chart(all_results: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return False
    fig, axes = plt.subplots(len(all_results), 1, figsize=(12, 5 * len(all_results)), squeeze=False)
    for ax, (where, results) in zip(axes[:, 0], all_results.items(), strict=True):
        servers_, jobs = list(results), _jobs(results)
        width = 0.8 / len(servers_)
        for i, s in enumerate(servers_):
            ref = results.get("nbdkit-file") or results[servers_[0]]
            vals = [results[s][j]["iops"] / max(ref[j]["iops"], 1) for j in jobs]
            ax.bar([k + i * width for k in range(len(jobs))], vals, width, label=s)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(jobs))])
        ax.set_xticklabels(jobs, rotation=20, fontsize=8)
        ax.set_ylabel("relative to nbdkit file plugin")
        ax.set_title(f"backing file on {where}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--repeat", type=int, default=1, help="fio runs per job in a row")
    ap.add_argument("--rounds", type=int, default=1,
                    help="passes over all servers, alternating them (noisy hosts)")
    ap.add_argument("--jobs", type=lambda s: s.split(","), default=None,
                    help="a subset of: " + ", ".join(JOBS))
    ap.add_argument("--no-tmpfs", action="store_true")
    ap.add_argument("--plugin", default=PLUGIN, help="the nbdkit entry script of our rows")
    ap.add_argument("--quick", action="store_true", help="2 s per job, tmpfs only, no scale run")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None)
    ap.add_argument("--no-disk", action="store_true")
    ap.add_argument("--no-scale", action="store_true")
    ap.add_argument("--no-neighbour", action="store_true")
    ap.add_argument("--no-sparse", action="store_true", help="skip the sparse-copy run")
    ap.add_argument("--sparse-cap", type=float, default=30,
                    help="seconds the copy without block status may run before it is projected")
    ap.add_argument("--threadmodel", default="serialize_all")
    ap.add_argument("--disk-dir", default=os.path.join(ROOT, "var"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--name", default=None,
                    help="write OUT/bench/NAME.{json,md,png} instead of the latest full run's "
                         "files (the default for partial runs: 'partial')")
    args = ap.parse_args()
    if args.quick:
        args.runtime, args.no_disk, args.no_scale, args.no_neighbour = 2, True, True, True
        args.no_sparse = True
    for tool in ("nbdkit", "fio", "qemu-nbd", "nbdcopy"):
        if not shutil.which(tool, path=ENV["PATH"]):
            sys.exit(f"bench: {tool} is not installed (make deps)")
    os.makedirs(args.disk_dir, exist_ok=True)
    all_results = {}
    if args.jobs and not set(args.jobs) <= set(JOBS):
        sys.exit(f"bench: unknown job in {args.jobs}; known: {', '.join(JOBS)}")
    if not args.no_tmpfs:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
            all_results["tmpfs"] = run_matrix("tmpfs", d, args)
    if not args.no_disk:
        with tempfile.TemporaryDirectory(dir=args.disk_dir) as d:
            all_results["disk"] = run_matrix("disk", d, args)
    scale_res = None if args.no_scale else scale(args)
    neighbour_res = None if args.no_neighbour else neighbour(args)
    sparse_res = None if args.no_sparse else sparse_copy(args)
    partial = bool(args.jobs or args.only or args.no_tmpfs or args.no_disk or args.no_scale
                   or args.no_neighbour or args.no_sparse)
    name = args.name = args.name or ("partial" if partial else None)  # never over the full run
    bench_dir = os.path.join(args.out, "bench")
    os.makedirs(bench_dir, exist_ok=True)
    with open(os.path.join(bench_dir, f"{name or 'latest'}.json"), "w") as f:
        json.dump({"results": all_results, "scale": scale_res, "neighbour": neighbour_res,
                   "sparse_copy": sparse_res,
                   "runtime": args.runtime,
                   "repeat": args.repeat, "rounds": args.rounds, "threadmodel": args.threadmodel,
                   "jobs": args.jobs or list(JOBS)}, f, indent=2)
    if all_results:
        chart(all_results, os.path.join(bench_dir, f"{name or 'chart'}.png"))
    md = markdown(all_results, scale_res, args, neighbour_res, sparse_res)
    with open(os.path.join(bench_dir, f"{name}.md") if name else
              os.path.join(args.out, "benchmarks.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
