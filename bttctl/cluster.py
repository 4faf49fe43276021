"""One control view over several servers: `bttctl VERB --control A --control B ...`.

There is no daemon and no registry of our own: each server's control socket is the truth,
asked afresh on every command. Sockets of other hosts are reached as local paths through
SSH's Unix socket forwarding (`ssh -N -L /run/btt/hostB.ctl:/srv/var/nbd.ctl hostB`,
docs/scale-out.md, "One control view").

* `list` shows the namespaces (or with -R the regions) of every server, each with the
  `host` and `pid` that serves it and the `control` socket it was asked through. A server
  that cannot be reached is named on stderr (exit status 1); the others are still listed.
* A verb that names a namespace finds it wherever it runs: by its uuid (the BTT's, or the
  namespace's `raw_uuid`), its alt_name or, when only one server has it, its device name,
  and is sent to that server with the device name. A name on several servers is refused
  (EINVAL) rather than guessed.
* `create-namespace` (new) must be told where: one --control.
"""
from __future__ import annotations

import errno
import json
import sys
import uuid as uuidlib

from btt_core.errors import errno_name
from bttctl.exits import EXIT_REFUSED
from bttctl.namespace import call, show_reply
from control.server import error_text


def server_info(control: str) -> dict:
    """{"host", "pid"} of the server behind `control` (the `server` op)."""
    reply = call(control, {"op": "server"})
    if not reply.get("ok"):
        raise OSError(errno.EPROTO, f"{control}: {reply.get('error')}")
    return reply["result"]


def _listing(control: str, req: dict) -> tuple[dict, list]:
    info = server_info(control)
    reply = call(control, req)
    if not reply.get("ok"):
        raise OSError(errno.EPROTO, error_text(reply.get("errno", ""), reply.get("error", "")))
    return info, reply["result"]


def _same(name: str, ns: dict) -> bool:
    """Whether `name` names this listed namespace: uuid (either), alt_name or device."""
    try:
        as_uuid = str(uuidlib.UUID(name))
    except ValueError:
        as_uuid = None
    if as_uuid is not None and as_uuid in (ns.get("uuid"), ns.get("raw_uuid")):
        return True
    return name in (ns.get("name"), ns.get("dev"), ns.get("holder"))


def find(controls: list[str], name: str) -> tuple[str, dict]:
    """(control, listed namespace) of the one namespace `name` names on these servers."""
    found, unreachable = [], []
    for control in controls:
        try:
            _info, listed = _listing(control, {"op": "list", "idle": True})
        except OSError as e:
            unreachable.append(f"{control} ({e.strerror or e})")
            continue
        found += [(control, ns) for ns in listed if _same(name, ns)]
    if found and unreachable and not _is_uuid(name):
        # A device name (or alt_name) may be on an unreachable server too: acting on the
        # one found could be acting on the wrong namespace. A uuid is the same everywhere.
        raise OSError(errno.EHOSTUNREACH, f"{name!r} found on {found[0][0]}, but not every "
                      f"server answered ({', '.join(unreachable)}), and another may have it "
                      "too: name it by uuid, or choose its server with one --control")
    if len(found) > 1:
        where = ", ".join(f"{ns['dev']} on {c}" for c, ns in found)
        raise OSError(errno.EINVAL, f"{name!r} names several namespaces ({where}): name it by "
                      "uuid or alt_name, or choose its server with one --control")
    if not found:
        also = f"; not reachable: {', '.join(unreachable)}" if unreachable else ""
        raise OSError(errno.ENODEV, f"no namespace {name!r} on {', '.join(controls)}{also}")
    return found[0]


def _is_uuid(name) -> bool:
    try:
        uuidlib.UUID(name)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def names_uuid(req: dict) -> bool:
    """Whether the request names its namespace by uuid (which servers resolve only here)."""
    return _is_uuid(req.get("namespace") or req.get("reconfig") or
                    req.get("path", "").split("/")[0])


def run(controls: list[str], req: dict) -> int:
    """Runs one verb over these servers; returns the exit status."""
    if req["op"] == "list":
        return _list(controls, req)
    key = next((k for k in ("namespace", "reconfig") if req.get(k)), None)
    if key is None and req["op"] in ("get", "set"):
        dev, slash, attr = req["path"].partition("/")
        control, ns = find(controls, dev)
        req = dict(req, path=f"{ns['dev']}{slash}{attr}")
    elif key is None:
        raise OSError(errno.EINVAL, f"{req['op']}: with several servers, say which: one "
                      "--control")
    else:
        control, ns = find(controls, req[key])
        req = dict(req, **{key: ns["dev"]})
    return show_reply(f"bttctl {req['op']}: {control}", call(control, req))


def _list(controls: list[str], req: dict) -> int:
    out, failed = [], 0
    for control in controls:
        try:
            info, listed = _listing(control, req)
        except OSError as e:
            failed += 1
            print(f"bttctl list: {control}: {error_text(errno_name(e.errno), e.strerror or '')}",
                  file=sys.stderr)
            continue
        for item in listed:
            item.update(host=info.get("host"), pid=info.get("pid"), control=control)
            for ns in item.get("namespaces", []):  # -R: regions, each with its namespaces
                ns.update(host=info.get("host"), control=control)
        out += listed
    json.dump(out, sys.stdout, indent=2)
    print()
    return EXIT_REFUSED if failed else 0
