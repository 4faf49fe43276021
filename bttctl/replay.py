"""`bttctl replay-log`: rebuild every crash state of a recorded workload and check each one
(btt_core/replay.py; the log format is docs/write-log.md).

Exit status: 0 every image recovered correctly, 1 failures (the first is printed), 64 usage
error, 65 the log cannot be replayed or is cut short (--allow-truncated accepts its prefix),
74 I/O error. The report goes to stdout (JSON with
--json), progress to stderr when it is a terminal.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys

from btt_core.errors import errno_name
from btt_core.replay import LogError, Replay, read_log
from bttctl.exits import EXIT_DATAERR, EXIT_IO, EXIT_USAGE
from bttctl.progress import ProgressLine

EXIT_OK, EXIT_FAILURES = 0, 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "replay-log", help="check every crash state of a recorded workload",
        description="Rebuild, from a write log (`bttctl serve --log-writes`) and a copy of the "
                    "region file taken before recording, every state a power cut or a kill -9 "
                    "could have left; recover each and check the BTT, every sector "
                    "(old-or-new; nothing acknowledged durable lost) and, with --fsck, the "
                    "client's file system. Exit status: 0 all correct, 1 failures, 64 usage "
                    "error, 65 unreadable or damaged log, 74 I/O error.")
    p.add_argument("log", help="the write log")
    p.add_argument("--image", required=True, metavar="BASE",
                   help="the region file as it was when recording began (a copy)")
    p.add_argument("--torn", type=int, default=3, metavar="N",
                   help="torn subsets built per crash point for a power cut (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the torn subsets (default 0)")
    p.add_argument("--max-points", type=int, default=0, metavar="N",
                   help="check at most N crash points, a random sample (default: all)")
    p.add_argument("--kind", choices=["power", "kill", "both"], default="both",
                   help="which crashes to build (default both; none durability: kill only)")
    p.add_argument("--fsck", metavar="CMD", nargs="?", const="e2fsck -fn",
                   help="run CMD IMAGE on each distinct export content (default when given "
                        "without CMD: e2fsck -fn); non-zero exit is a failure")
    p.add_argument("--fsck-prepare", metavar="CMD",
                   help="run CMD IMAGE before --fsck's command, its status ignored (default "
                        "for e2fsck: `e2fsck -E journal_only -y`, which replays ext4's journal "
                        "on the scratch copy as a mount would; '' for none)")
    p.add_argument("--workdir", metavar="DIR", help="where --fsck's image copy goes (default: "
                   "the system's temporary directory)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--allow-truncated", action="store_true",
                   help="a log whose end is cut short or damaged (the recording host lost "
                   "power) passes on its readable prefix; without this it exits 65")
    p.set_defaults(func=cmd_replay)


class _Progress(ProgressLine):
    def __call__(self, done: int, total: int, rep) -> None:
        self.show(f"crash point {done}/{total}: {rep.images} images, {rep.failures} failures")


def cmd_replay(args) -> int:
    if args.torn < 0 or args.max_points < 0:
        print("bttctl replay-log: --torn and --max-points must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    fsck = shlex.split(args.fsck) if args.fsck else None
    if fsck and not shutil.which(fsck[0]):
        print(f"bttctl replay-log: {fsck[0]}: command not found", file=sys.stderr)
        return EXIT_USAGE
    prepare = shlex.split(args.fsck_prepare) if args.fsck_prepare else None
    if fsck and args.fsck_prepare is None and os.path.basename(fsck[0]) == "e2fsck":
        prepare = [fsck[0], "-E", "journal_only", "-y"]
    kinds = ("power", "kill") if args.kind == "both" else (args.kind,)
    progress = _Progress(sys.stderr)
    try:
        replay = Replay(read_log(args.log), args.image, torn=args.torn, seed=args.seed,
                        fsck=fsck, fsck_prepare=prepare, max_points=args.max_points, kinds=kinds,
                        workdir=args.workdir, progress=progress)
        rep = replay.run()
    except LogError as e:
        print(f"bttctl replay-log: {e.strerror} ({errno_name(e.errno)})", file=sys.stderr)
        return EXIT_DATAERR
    except OSError as e:
        print(f"bttctl replay-log: {e.strerror or e} ({errno_name(e.errno or 5)})",
              file=sys.stderr)
        return EXIT_IO
    finally:
        progress.done()
    d = rep.as_dict()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        kinds_text = ", ".join(f"{n} {k}" for k, n in d["images_by_kind"].items())
        print(f"{d['images']} crash images ({kinds_text}) at {d['points']} crash points: "
              f"{d['failures']} failures in {d['failed_images']} images; "
              f"{d['torn_sectors']} torn sectors, "
              f"{d['lost_durable_writes']} lost durable writes"
              + (f", {d['fsck_failures']} of {d['fsck_runs']} {fsck[0]} runs failed"
                 if fsck else ""))
        if d["log_truncated"]:
            print(f"the log ends early ({d['log_truncated']}): replayed up to there"
                  + ("" if args.allow_truncated else "; not all of it was checked (exit 65; "
                     "--allow-truncated accepts the prefix)"))
        if d["first_failure"]:
            f = d["first_failure"]
            print(f"first failure: {f['kind']} crash at record {f['point']} "
                  f"({f['variant']}): {f['problem']}")
    if rep.failures:
        return EXIT_FAILURES
    # A damaged record in the middle of a long log would otherwise pass the prefix before
    # it as the whole workload: only a caller who knows the recording was cut accepts that.
    return EXIT_DATAERR if d["log_truncated"] and not args.allow_truncated else EXIT_OK
