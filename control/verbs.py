"""The control API: sysfs-like `get`/`set` and ndctl-style verbs over a Registry's regions.

The control socket calls `handle(registry, request)`; the offline CLI (`--region FILE`) calls
it the same way on a registry that serves nothing. Refusals raise `NdError` with the
kernel's errno, before anything has changed. Requests are JSON objects; "op" selects:

  {"op": "list", "idle": false, "regions": false}
  {"op": "get", "path": "namespace0.0/size"}
  {"op": "set", "path": "namespace0.0/alt_name", "value": "db", "force": false}
  {"op": "enable-namespace", "namespace": "namespace0.0"}
  {"op": "disable-namespace", "namespace": "namespace0.0", "force": false}
  {"op": "create-namespace", "mode": "sector", "sector_size": 4096, "size": "256M",
   "name": "db", "uuid": null, "region": "region0"}
  {"op": "create-namespace", "reconfig": "namespace0.1", "force": true, "mode": "raw"}
  {"op": "destroy-namespace", "namespace": "namespace0.1", "force": false}
  {"op": "server"}  (who answers: host, pid, boot id, region files)

A namespace may be named by its name or its alt_name. Changes that would take an export
away from connected NBD clients are refused with EBUSY unless "force" is true; forced, the
clients' next requests fail.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import uuid as uuidlib

from btt_core.engine import boot_id
from btt_core.errors import one_line
from nvdimm.attrs import check_alt_name, parse_uuid
from nvdimm.constants import (
    BTT_INFO_OFFSET,
    BTT_VERSION_FOR_CLASS,
    MIN_CLAIM_SIZE,
    PMEM_SECTOR_SIZES,
)
from nvdimm.errors import NdError
from nvdimm.regionfile import DEVICE_NAME

BTT_NAME = re.compile(r"btt\d+\.\d+$")  # a btt device, not an alt_name that starts so
# NBD has no integrity channel for 520/528/41xx sectors: exports carry what pmem labels can
# say, and so does a BTT created through us.
WIRE_SECTOR_SIZES = PMEM_SECTOR_SIZES
MODES = {"sector": "sector", "safe": "sector", "raw": "raw"}
SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


# ---- request fields ---------------------------------------------------------------------------

def _field(req: dict, key: str, kind, default=None):
    """req[key] checked against `kind`; missing or null means `default`."""
    value = req.get(key)
    if value is None:
        return default
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise NdError(errno.EINVAL, f"{key!r} must be {names}, not {type(value).__name__}")


def parse_size(value) -> int:
    """Bytes from an int or text like 4096, 256M, 1G, 0x1000 (binary suffixes, as ndctl)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value).strip().lower()
    suffix = text[-1:] if text[-1:] in SIZE_SUFFIXES else ""
    number = text[:-1] if suffix else text
    try:
        n = int(number, 0)
    except ValueError:
        n = -1
    if n < 0:
        raise NdError(errno.EINVAL, f"size {value!r}: expected bytes, optionally with K, M, G "
                      "or T (e.g. 256M)")
    return n * SIZE_SUFFIXES[suffix]


def _mode(value) -> str:
    if value not in MODES:
        raise NdError(errno.EINVAL, f"mode {value!r}; valid: sector (alias safe), raw")
    return MODES[value]


def _sector_size(value) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = None
    if size not in WIRE_SECTOR_SIZES:
        raise NdError(errno.EINVAL, f"sector size {value!r}; valid: "
                      f"{', '.join(map(str, WIRE_SECTOR_SIZES))} (NBD cannot carry the "
                      "integrity bytes of 520/528/41xx sectors)")
    return size


# ---- describing things (ndctl list's field names) ----------------------------------------------

def configured_mode(region, ns) -> str:
    """The mode a namespace has even while disabled, so a disabled sector namespace does
    not read "raw" (ndctl's quirk): a claim or a BTT claim class says sector, else a probe."""
    if ns.active_mode:
        return ns.active_mode
    if ns.claim is not None or ns.claim_class in ("btt", "btt2"):
        return "sector"
    versions = region.autodetect_versions(ns) if ns.size else []
    try:  # exactly what an enable would look for
        found = any(region.media.probe(ns.offset, ns.size, v) for v in versions)
    except OSError:
        return "sector"  # a damaged BTT is still a BTT
    return "sector" if found else "raw"


def describe_namespace(registry, region, ns, stats: bool = False) -> dict:
    mode = configured_mode(region, ns)
    out = {"dev": ns.name, "mode": mode, "state": "enabled" if ns.active_mode else "disabled"}
    btt = ns.claim
    if btt is not None and btt.bound:
        out.update(size=btt.info["size"], uuid=str(btt.info["uuid"]),
                   sector_size=btt.info["sector_size"])
    else:
        sector = ns.sector_size if ns.kind == "pmem" else 4096
        out.update(size=ns.size - ns.size % sector, sector_size=sector)
        if ns.uuid:
            out["uuid"] = str(ns.uuid)
    if ns.uuid:
        out["raw_uuid"] = str(ns.uuid)
    if ns.alt_name:
        out["name"] = ns.alt_name
    if btt is not None:
        out["holder"] = btt.name
    if ns.force_raw:
        out["force_raw"] = True
    exp = registry.export_of(ns.name)
    if ns.active_mode:
        out["export"] = ns.name
    out.update(region=region.name, path=region.path, offset=ns.offset, raw_size=ns.size,
               clients=exp.clients if exp else 0)
    backend = exp.backend if exp else None
    if stats and backend is not None and backend.mode == "sector":
        # What durability costs on this export: fdatasyncs ("syncs") per sector written.
        out.update(durability=backend.durability, stats=backend.btt.stats())
    return out


def describe_region(registry, region, idle: bool, stats: bool = False) -> dict:
    return {"dev": region.name, "size": region.size, "align": region.align,
            "available_size": region.available_size,
            "max_available_extent": region.max_available_extent, "type": "pmem",
            "labels": region.store.version or "none", "read_only": region.read_only,
            "path": region.path, "namespaces": _namespaces(registry, region, idle, stats)}


def _namespaces(registry, region, idle: bool, stats: bool = False) -> list[dict]:
    return [describe_namespace(registry, region, ns, stats) for ns in region.namespaces.values()
            if ns.configured and (idle or ns.active_mode)]


# ---- helpers shared by the verbs --------------------------------------------------------------

def _target(registry, req: dict, key: str = "namespace"):
    """(region, namespace) named by req[key]: a namespace name, alt_name, or btt name."""
    name = _field(req, key, str)
    if not name:
        raise NdError(errno.EINVAL, f"{key!r} is required, e.g. namespace0.0")
    if BTT_NAME.match(name):
        region = registry.region_of(name)
        btt = region.device(name)
        if btt.ndns is None:
            raise NdError(errno.ENXIO, f"{name} holds no namespace")
        return region, btt.ndns
    return registry.namespace(name)


def _refuse_taken_name(registry, name: str, ns=None) -> None:
    """Deviation: Linux lets two namespaces share an alt_name. Here an alt_name is an export
    name and a control handle, so a second holder would silently take it away from the
    first (QEMU's export=NAME then breaks); a device name would be shadowed, or change
    hands when names are given out afresh."""
    if not name:
        return
    for region in registry.regions:
        for other in region.namespaces.values():
            if other is ns:
                continue
            if other.name == name or (other.configured and other.alt_name == name):
                raise NdError(errno.EEXIST, f"the name {name!r} is taken by {other.name}"
                              + (" (its alt_name)" if other.name != name else "")
                              + "; choose another --name")
        for btt in region.btts.values():
            if btt.name == name:
                raise NdError(errno.EEXIST, f"the name {name!r} is taken by the btt device "
                              f"{btt.name}; choose another --name")
    if DEVICE_NAME.match(name):
        raise NdError(errno.EINVAL, f"alt_name {name!r} looks like a device name, which the "
                      "namespaces are given afresh whenever a region is read; choose another")


def _device_path(registry, path: str) -> str:
    """DEVICE/ATTRIBUTE with an alt_name as DEVICE replaced by its namespace's name: the
    README promises that an alt_name names its namespace everywhere."""
    dev, slash, attr = path.partition("/")
    if not dev or DEVICE_NAME.match(dev) or not slash:
        return path
    _region, ns = registry.namespace(dev)
    return f"{ns.name}/{attr}"


def _refuse_if_clients(registry, names, force: bool, what: str) -> None:
    for name in names:
        exp = registry.export_of(name)
        if exp is not None and exp.clients and not force:
            raise NdError(errno.EBUSY, f"{what}: {name} has {exp.clients} connected NBD "
                          "client(s); disconnect them first, or use --force (their requests then "
                          "fail)")


def _sync(registry, names) -> None:
    """Makes exports follow the model; a namespace that failed to open is reported (the
    model has already been set back to disabled)."""
    for name, err in registry.sync():
        if name in names:
            raise NdError(err.errno or errno.EIO, f"{name} could not be served: "
                          f"{err.strerror or err}")


def _disable(region, ns) -> None:
    """ndctl disable-namespace: unbind and delete the personality, unbind the namespace."""
    btt = ns.claim
    if btt is not None:
        if btt.bound:
            region.unbind(btt.name)
        region.set(f"{btt.name}/namespace", "")
    if ns.bound:
        region.unbind(ns.name)


def _refuse_read_only(region, what: str) -> None:
    if region.read_only:
        raise NdError(errno.EROFS, f"{what}: {region.name} is read-only ({region.path} is not "
                      f"writable, or {region.name}/read_only is set)")


def _bind(region, ns, mode: str, sector_size: int, btt_uuid=None) -> None:
    """Serves ns raw, or claims it with the btt seed: the BTT laid down with `btt_uuid`
    is found and used (without one, a fresh BTT is laid down)."""
    if mode == "raw":
        region.bind(ns.name)
        return
    btt = region.btt_seed
    try:
        region.set(f"{btt.name}/uuid", str(btt_uuid or uuidlib.uuid4()))
        region.set(f"{btt.name}/sector_size", str(sector_size))
        region.set(f"{btt.name}/namespace", ns.name)
        region.bind(btt.name)
    except NdError:
        if not btt.bound:
            region.set(f"{btt.name}/namespace", "")  # resets the seed
        raise


def _steps(prepare, commit, cleanup) -> None:
    """The one place the order of a data-changing verb lives, so that a crash (kill -9 or
    power loss) anywhere in it leaves the old state or the new one, never a third:

    * prepare writes only what no committed label names (free space), synced;
    * commit is ONE durable write: the label index block, or in a label-less file the
      primary BTT info block;
    * cleanup touches only what the committed state no longer names (or lays down what
      only the new state names, where it cannot be prepared: see docs/namespaces.md §5)."""
    prepare()
    commit()
    cleanup()


def _undo_create(region, ns) -> None:
    """Best effort after a failed create: the new namespace's claim and label go away."""
    for step in (lambda: _disable(region, ns),
                 lambda: ns.size and region.set(f"{ns.name}/size", "0"),
                 lambda: region.set(f"{ns.name}/alt_name", "")):
        try:
            step()
        except NdError:
            pass
    if not ns.size:
        ns.uuid = None  # a seed keeps no uuid from a failed attempt (it would block reuse)


# ---- the verbs ---------------------------------------------------------------------------------

def op_list(registry, req):
    # Offline (nothing served) every namespace is disabled: show them all.
    idle = bool(_field(req, "idle", bool, False)) or not registry.serving
    stats = bool(_field(req, "stats", bool, False))
    if _field(req, "regions", bool, False):
        out = [describe_region(registry, r, idle, stats) for r in registry.regions]
        listed = [ns for r in out for ns in r["namespaces"]]
    else:
        out = listed = [d for r in registry.regions for d in _namespaces(registry, r, idle, stats)]
    if _field(req, "at_start", bool, False) and not registry.serving:
        _state_at_start(registry, listed)
    return out


def _state_at_start(registry, listed: list[dict]) -> None:
    """Offline (`bttctl list --region`) nothing is enabled, and "disabled" everywhere said
    nothing: state becomes what a server would make of each namespace when it starts (the
    labels and the BTTs decide; Linux keeps no enabled flag on media either), and a
    namespace it would refuse says why."""
    from nvdimm.regionfile import open_region
    for region in registry.regions:
        started = open_region(region.path, region.id, autobind=True, read_only=True)
        for d in listed:
            if d["path"] != region.path or d["dev"] not in started.namespaces:
                continue
            ns = started.namespaces[d["dev"]]
            d["state"] = "enabled" if ns.active_mode else "disabled"
            if ns.active_mode:
                d["mode"] = ns.active_mode
            if ns.name in started.probe_errors:
                err = started.probe_errors[ns.name]
                d["refused"] = one_line(err)


def op_get(registry, req):
    path = _device_path(registry, _field(req, "path", str) or "")
    return registry.region_of(path.split("/")[0]).get(path)


def op_set(registry, req):
    path = _device_path(registry, _field(req, "path", str) or "")
    value = _field(req, "value", str)
    if value is None:
        raise NdError(errno.EINVAL, "'value' is required (text, as written to sysfs)")
    region = registry.region_of(path.split("/")[0])
    if path.endswith("/alt_name"):
        dev = region.device(path.split("/")[0])
        _refuse_taken_name(registry, check_alt_name(value), dev)
    if path == f"{region.name}/read_only":  # the only write that changes live exports
        _refuse_if_clients(registry, region.namespaces, _field(req, "force", bool, False), path)
    region.set(path, value)
    _sync(registry, set(region.namespaces))
    return region.get(path)


def op_enable(registry, req):
    name = _field(req, "namespace", str) or ""
    region, ns = _target(registry, req)
    if BTT_NAME.match(name):  # a btt configured by hand: bind it (EBUSY if ns is raw)
        if not region.device(name).bound:
            region.bind(name)
    elif not ns.active_mode:
        region.bind(ns.name)
    _sync(registry, {ns.name})
    return describe_namespace(registry, region, ns)


def op_disable(registry, req):
    region, ns = _target(registry, req)
    _refuse_if_clients(registry, [ns.name], _field(req, "force", bool, False), "disable-namespace")
    _disable(region, ns)
    _sync(registry, ())
    return describe_namespace(registry, region, ns)


def _pick_region(registry, req, size: int | None):
    wanted = _field(req, "region", (str, int))
    if wanted is not None:
        wanted = str(wanted)
        region = registry.region_of(wanted if wanted.startswith("region") else f"region{wanted}")
        if not region.labelled:
            raise NdError(errno.ENXIO, f"{region.name} ({region.path}) is label-less: its one "
                          f"namespace, namespace{region.id}.0, covers the whole file; "
                          f"reconfigure it with create-namespace -e namespace{region.id}.0, or "
                          "make a labelled region with create-region")
        return region
    labelled = [r for r in registry.regions if r.labelled and not r.read_only]
    for region in labelled:
        if region.max_available_extent >= (size or 1):
            return region
    if not labelled and any(r.labelled for r in registry.regions):
        # Not "label-less": the labels are there, but nothing may write them.
        raise NdError(errno.EROFS, "create-namespace: every labelled region is read-only ("
                      + ", ".join(f"{r.name}: {r.path}" for r in registry.regions
                                  if r.labelled) + "); the server runs with --readonly, or "
                      "the files are not writable")
    if not labelled:
        raise NdError(errno.ENXIO, "no labelled, writable region to create a namespace in "
                      "(label-less files hold one namespace; use create-namespace -e, or "
                      "create-region)")
    asked = f"{size} bytes" if size else "any space (no --size: the largest free extent)"
    raise NdError(errno.ENOSPC, f"no region has room for {asked}; free: " + ", ".join(
        f"{r.name} {r.available_size} bytes (largest extent {r.max_available_extent})"
        for r in labelled))


def _check_claim_size(mode: str, size: int, version: str = "2.0") -> None:
    need = MIN_CLAIM_SIZE + BTT_INFO_OFFSET[version]
    if mode == "sector" and size < need:
        raise NdError(errno.ENXIO, f"a sector namespace needs at least {need} bytes "
                      f"(16 MiB for the BTT); got {size}")


def op_create(registry, req):
    if req.get("reconfig") is not None:
        return op_reconfig(registry, req)
    mode = _mode(_field(req, "mode", str, "sector"))
    sector_size = _sector_size(req.get("sector_size", 4096))
    size = parse_size(req["size"]) if req.get("size") is not None else None
    name = _field(req, "name", str, "")
    new_uuid = parse_uuid(_field(req, "uuid", str)) if req.get("uuid") else uuidlib.uuid4()
    _refuse_taken_name(registry, check_alt_name(name))
    region = _pick_region(registry, req, size)
    _refuse_read_only(region, "create-namespace")
    ns = region.namespace_seed
    first = region.namespaces.get(f"namespace{region.id}.0")
    if first is not None and not first.configured:
        ns = first  # ndctl takes an emptied namespaceR.0 (kept registered) before the seed
    if size is None:
        size = region.max_available_extent - region.max_available_extent % region.align
    version = BTT_VERSION_FOR_CLASS["btt" if region.store.version == "1.1" else "btt2"]
    _check_claim_size(mode, size, version)
    offset = region.check_size(ns.name, size)
    btt_uuid = uuidlib.uuid4()

    def prepare():
        # Free space, named by no label: whatever is written here is invisible until the
        # label commits, and then it is complete. A BTT left behind by a destroy that was
        # cut short may lie here: it is overwritten, or erased for a raw namespace.
        if mode == "sector":
            region.media.format(offset, size, version=version, uuid=btt_uuid,
                                parent_uuid=new_uuid, sector_size=sector_size)
        else:
            region.media.erase_btt(offset, size)

    def commit():
        region.set(f"{ns.name}/uuid", str(new_uuid))  # no label yet: no capacity
        region.set(f"{ns.name}/alt_name", name)
        region.set(f"{ns.name}/sector_size", str(sector_size))
        region.set(f"{ns.name}/holder_class", "btt" if mode == "sector" else "")
        region.set(f"{ns.name}/size", str(size))  # the one label write

    try:
        _steps(prepare, commit, lambda: None)
        _bind(region, ns, mode, sector_size, btt_uuid)
        _sync(registry, {ns.name})
    except Exception:  # any failure: no label or claim may stay behind
        _undo_create(region, ns)
        _sync(registry, ())
        raise
    return describe_namespace(registry, region, ns)


def _victim(registry, req, key: str, verb: str):
    """The namespace a data-destroying verb (destroy, reconfigure) names, once it is sure
    the verb may go ahead: configured, writable, and enabled or connected only if forced."""
    region, ns = _target(registry, req, key)
    if not ns.configured:
        raise NdError(errno.ENXIO, f"{ns.name} is a seed: there is nothing to {verb} (use "
                      "create-namespace)")
    _refuse_read_only(region, verb)
    force = _field(req, "force", bool, False)
    if ns.active_mode and not force:
        raise NdError(errno.EBUSY, f"{verb}: {ns.name} is enabled and its data would be "
                      "lost: disable it first, or use --force")
    _refuse_if_clients(registry, [ns.name], force, verb)
    return region, ns


def op_reconfig(registry, req):
    """create-namespace -e: a new namespace in the old one's place. Its contents are not
    kept (the BTT is new; the old bytes are not scrubbed, as with ndctl)."""
    region, ns = _victim(registry, req, "reconfig", "create-namespace -e")
    old = describe_namespace(registry, region, ns)
    mode = _mode(_field(req, "mode", str, old["mode"]))
    sector_size = _sector_size(req.get("sector_size", old["sector_size"]))
    size = parse_size(req["size"]) if req.get("size") is not None else ns.size
    name = _field(req, "name", str, ns.alt_name)
    if ns.kind == "io":
        if size != ns.size or req.get("name") or req.get("uuid"):
            raise NdError(errno.ENXIO, f"{ns.name} is label-less: its size is the file's, and "
                          "it has no uuid or name to set")
        version = "1.1"
    else:
        version = BTT_VERSION_FOR_CLASS["btt" if region.store.version == "1.1" else "btt2"]
        region.check_size(ns.name, size)
    _check_claim_size(mode, size, version)
    new_uuid = parse_uuid(_field(req, "uuid", str)) if req.get("uuid") else uuidlib.uuid4()
    # Everything that could refuse is checked before the old namespace is touched.
    name = check_alt_name(name)
    _refuse_taken_name(registry, name, ns)
    owner = region.uuid_owner(new_uuid, ns.name)
    if owner and owner != (ns.claim.name if ns.claim else None):  # that btt goes anyway
        raise NdError(errno.EINVAL, f"uuid {new_uuid} is already used by {owner}")

    old_offset, old_size = ns.offset, ns.size
    btt_uuid = uuidlib.uuid4()
    _disable(region, ns)
    _sync(registry, ())
    region.set(f"{ns.name}/force_raw", "0")

    def lay_down():
        """The new contents of the extent: a BTT written over the old one (its unused info
        blocks zeroed after), or for raw, every old info block erased (backups first)."""
        if mode == "sector":
            parent = ns.uuid if ns.kind == "pmem" else uuidlib.UUID(int=0)
            region.media.format(ns.offset, ns.size, version=version, uuid=btt_uuid,
                                parent_uuid=parent, sector_size=sector_size, old_size=old_size)
            return
        region.media.erase_btt(old_offset, old_size)  # the old backups lie at the old end
        if (ns.offset, ns.size) != (old_offset, old_size):
            region.media.erase_btt(ns.offset, ns.size)

    if ns.kind == "pmem":
        # The new BTT can only go where the old namespace is, which the committed label
        # names until the commit: so the label commits first (one write, nothing touched
        # before it), and the extent is rewritten after. In between the namespace has its
        # new identity and is refused (ENXIO or EUCLEAN), never served raw.
        _steps(lambda: None, lambda: region.redefine(
            ns.name, uuid=str(new_uuid), alt_name=name, sector_size=str(sector_size),
            holder_class="btt" if mode == "sector" else "", size=size), lay_down)
    else:
        # Label-less: the BTT's primary info block is the commit (written last by a
        # format, erased last by an erase).
        _steps(lambda: None, lay_down, lambda: None)
    _bind(region, ns, mode, sector_size, btt_uuid)
    _sync(registry, {ns.name})
    return describe_namespace(registry, region, ns)


def op_destroy(registry, req):
    region, ns = _victim(registry, req, "namespace", "destroy-namespace")
    _disable(region, ns)
    _sync(registry, ())
    extent = (ns.offset, ns.size)
    if ns.kind == "pmem":
        # The label goes first (frees the capacity): the BTT left behind lies in free
        # space, where no autodetect looks, and is erased after; the other order left a
        # sector label over erased info blocks, served raw after a crash.
        _steps(lambda: None, lambda: region.set(f"{ns.name}/size", "0"),
               lambda: region.media.erase_btt(*extent))
    else:
        # Label-less: erasing the primary info block (last) is the commit.
        _steps(lambda: None, lambda: region.media.erase_btt(*extent), lambda: None)
    registry.forget(ns.name)
    _sync(registry, ())
    return {"dev": ns.name, "destroyed": True}


def op_server(registry, req):
    """Who answers on this socket: one control view over several servers (bttctl/cluster.py)
    names each namespace's host, and a socket forwarded from another host says which."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": boot_id().hex(),
            "serving": registry.serving, "regions": [r.path for r in registry.regions]}


OPS = {"server": op_server, "list": op_list, "get": op_get, "set": op_set,
       "enable-namespace": op_enable, "disable-namespace": op_disable,
       "create-namespace": op_create, "destroy-namespace": op_destroy}


def handle(registry, req: dict):
    op = req.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise NdError(errno.EINVAL, f"unknown op {op!r}; valid: {', '.join(OPS)}")
    with registry.lock:
        return OPS[op](registry, req)
