"""`bttctl list`, `enable-namespace`, `disable-namespace`: talk to a running server's control
socket (`--control PATH`, printed by `bttctl serve`). JSON on stdout, errors on stderr
naming the errno; exit 0 on success, 1 on a refusal, 64 on usage errors."""
from __future__ import annotations

import json
import os
import sys

from plugin.control import request

DEFAULT_CONTROL = os.path.join("var", "nbd.ctl")


def register(subparsers) -> None:
    p = subparsers.add_parser("list", help="list the namespaces of a running server")
    _control_arg(p)
    p.set_defaults(func=lambda a: _call(a, {"op": "list"}))
    for verb, helptext in (("enable-namespace", "enable (export) a namespace"),
                           ("disable-namespace", "disable (unexport) a namespace")):
        p = subparsers.add_parser(verb, help=helptext)
        p.add_argument("namespace", help="e.g. namespace0.0")
        _control_arg(p)
        if verb == "disable-namespace":
            p.add_argument("--force", action="store_true",
                           help="disable even with clients connected (their requests then fail)")
        p.set_defaults(func=lambda a, verb=verb: _call(
            a, {"op": verb, "namespace": a.namespace, "force": getattr(a, "force", False)}))


def _control_arg(p) -> None:
    p.add_argument("--control", default=DEFAULT_CONTROL,
                   help=f"the server's control socket (default: {DEFAULT_CONTROL})")


def call(control: str, req: dict) -> dict:
    """One request; raises OSError when the server cannot be reached."""
    if not os.path.exists(control):
        raise FileNotFoundError(f"no control socket at {control}: is `bttctl serve` running?")
    return request(control, req)


def _call(args, req) -> int:
    try:
        reply = call(args.control, req)
    except OSError as e:
        print(f"bttctl: {e}", file=sys.stderr)
        return 64
    if not reply.get("ok"):
        print(f"bttctl: {req['op']}: {reply.get('error')} ({reply.get('errno')})", file=sys.stderr)
        return 1
    json.dump(reply["result"], sys.stdout, indent=2)
    print()
    return 0
