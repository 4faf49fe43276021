"""What the server exports, kept in step with the libnvdimm model of each region file.

Each region file (`region=` on the plugin, `--region` on the CLI) becomes one
`nvdimm.region.Region`: labelled files (a Linux/UEFI label area at the end, as QEMU keeps it) hold
the namespaces their labels describe; a label-less file is one io namespace over the whole
file. The model decides what is enabled and in which mode; `Registry.sync()` then makes the
exports match it: an enabled namespace is exported under its name (and its alt_name) raw or
through the BTT engine, a disabled one is not exported at all.

An export keeps its connection count across backend changes. A connection holds the backend
it opened with, so when a namespace is disabled or switches mode under it (only ever when
forced), its requests fail (ESHUTDOWN/EIO) instead of reaching what is served next.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Any

from nvdimm.errors import NdError
from nvdimm.region import Region
from nvdimm.regionfile import DEVICE_NAME, open_region
from plugin.backends import RAW_SECTOR, RawBackend, SectorBackend


class Export:
    """One namespace as the server sees it: its live backend (or None) and its clients."""

    def __init__(self, region: Region, ns_name: str):
        self.region, self.name = region, ns_name
        self.backend: Any = None  # a RawBackend or SectorBackend while enabled
        self.key = None  # what the backend was opened for; a change means reopen
        self.alias = ""  # alt_name: a second export name
        self.clients = 0  # open NBD connections (changed under Registry.lock)

    @property
    def path(self) -> str:
        return self.region.path

    def description(self, backend=None) -> str:
        """What is served; `backend` (a connection's own) instead of the current one."""
        b = backend or self.backend
        if b is None:
            return f"{self.name}: disabled"
        desc = f"{b.mode} mode, {b.sector_size}-byte sectors, {b.size} bytes"
        if b.mode == "sector":
            desc += f", BTT {b.btt.version} uuid {b.uuid}"
        return desc + (", read-only" if b.readonly else "")


class Registry:
    """Region models and their exports. Changes happen under `lock` (the kernel's bus lock);
    the data path never takes it. Without `serving` (the offline CLI), sync opens nothing."""

    def __init__(self, settings: dict | None = None, serving: bool = True):
        self.lock = threading.RLock()
        self.settings = settings or {}
        self.serving = serving
        self.regions: list[Region] = []
        self.exports: dict[str, Export] = {}  # namespace name -> Export
        self.names: dict[str, Export] = {}  # export name -> enabled Export; replaced whole

    # -- regions

    def add_region(self, path: str) -> Region:
        # Offline nothing is served, so nothing is enabled (or claimed) either.
        region = open_region(path, len(self.regions), autobind=self.serving,
                             read_only=self.settings.get("readonly") == "on")
        self.regions.append(region)
        return region

    def region_of(self, device: str) -> Region:
        """The region a device name (regionR, namespaceR.M, bttR.M) belongs to."""
        for region in self.regions:
            rid = str(region.id)
            if device == region.name or device.split(".")[0] in (f"namespace{rid}",
                                                                 f"btt{rid}"):
                return region
        raise NdError(errno.ENODEV, f"no device {device!r}; regions: "
                      f"{', '.join(r.name for r in self.regions) or 'none'}")

    def namespace(self, name: str):
        """(region, namespace) by namespace name or alt_name; ENODEV names what exists."""
        for region in self.regions:
            if name in region.namespaces:  # a namespace's own name wins over an alt_name
                return region, region.namespaces[name]
        holders = self._alt_name_holders().get(name, [])
        if len(holders) == 1:
            return holders[0]
        if holders:
            raise NdError(errno.EINVAL, f"alt_name {name!r} is shared by "
                          f"{', '.join(ns.name for _, ns in holders)}: name the namespace")
        known = [ns.name for r in self.regions for ns in r.namespaces.values() if ns.configured]
        raise NdError(errno.ENODEV, f"no namespace {name!r}; namespaces: "
                      f"{', '.join(known) or 'none'}")

    def _alt_name_holders(self) -> dict[str, list]:
        """alt_name -> [(region, namespace)] over every configured namespace."""
        out: dict[str, list] = {}
        for region in self.regions:
            for ns in region.namespaces.values():
                if ns.alt_name and ns.configured:
                    out.setdefault(ns.alt_name, []).append((region, ns))
        return out

    def export_of(self, ns_name: str) -> Export | None:
        return self.exports.get(ns_name)

    # -- keeping exports in step with the models

    def _wanted(self, region: Region, ns):
        """(key, opener) for what `ns` should serve now, or (None, None)."""
        key: tuple
        readonly = region.read_only or not os.access(region.path, os.W_OK)
        mode = ns.active_mode
        if mode == "sector":
            info = ns.claim.info
            key = ("sector", ns.offset, ns.size, info["version"], str(info["uuid"]), readonly)
            s = self.settings
            return key, lambda: SectorBackend(
                region.path, ns.offset, ns.size, readonly, s.get("durability", "group"),
                s.get("zero-flag", "off") == "on", int(s.get("commit-ms", 50)),
                version=info["version"], log=s.get("writelog"))
        if mode == "raw":
            sector = ns.sector_size if ns.kind == "pmem" else RAW_SECTOR
            key = ("raw", ns.offset, ns.size, sector, readonly)
            return key, lambda: RawBackend(region.path, ns.offset, ns.size, readonly, sector)
        return None, None

    def sync(self) -> list[tuple[str, OSError]]:
        """Opens, reopens and closes backends until the exports match the models.

        A backend that fails to open is undone in the model too (the namespace or its btt is
        unbound again), so model and exports never disagree; the errors are returned."""
        errors = []
        live = set()
        for region in self.regions:
            for ns in list(region.namespaces.values()):
                exp = self.exports.get(ns.name)
                if exp is None:
                    exp = self.exports[ns.name] = Export(region, ns.name)
                live.add(ns.name)
                key, opener = self._wanted(region, ns)
                if key != exp.key:
                    self._close(exp)
                    if key is not None and self.serving:
                        try:
                            exp.backend = opener()
                        except OSError as e:
                            errors.append((ns.name, e))
                            self._undo_enable(region, ns)
                            key = None
                    exp.key = key
                exp.alias = ns.alt_name if exp.key is not None else ""
        for name in [n for n in self.exports if n not in live]:
            # Gone (destroyed): its connections keep their own Export object, and a new
            # namespace under this name starts from a fresh one, with no clients.
            self._close(self.exports.pop(name))
        enabled = [exp for exp in self.exports.values() if exp.key is not None]
        names = {exp.name: exp for exp in enabled}
        # An alias is exported only while exactly one namespace carries it, and never takes
        # a device name (namespaceR.M, even a disabled one's): a client that reconnects by
        # name, and a control request naming it, can never reach another disk.
        unique = {alias for alias, holders in self._alt_name_holders().items()
                  if len(holders) == 1 and not DEVICE_NAME.match(alias)}
        for exp in enabled:
            if exp.alias in unique:
                names.setdefault(exp.alias, exp)
        self.names = names  # one assignment: lookups never see a half-built table
        return errors

    def forget(self, ns_name: str) -> None:
        """A destroyed namespace's export record goes, with its connection count: whatever
        is created under the name next starts afresh (its old clients stay cut off)."""
        exp = self.exports.pop(ns_name, None)
        if exp is not None:
            self._close(exp)
            self.names = {n: e for n, e in self.names.items() if e is not exp}

    @staticmethod
    def _undo_enable(region: Region, ns) -> None:
        if ns.claim is not None and ns.claim.bound:
            region.unbind(ns.claim.name)
        if ns.bound:
            region.unbind(ns.name)

    @staticmethod
    def _close(exp: Export) -> None:
        backend, exp.backend, exp.key = exp.backend, None, None
        if backend is None:
            return
        try:
            backend.close()
        except OSError as e:  # e.g. after a failed fdatasync: say so once, plainly
            print(f"{exp.name}: closing {exp.path}: {e}", file=sys.stderr)

    def close_all(self) -> None:
        with self.lock:
            for exp in self.exports.values():
                self._close(exp)
            self.names = {}

    # -- what connections see

    def list_exports(self) -> list[tuple[str, str]]:
        out = []
        for name, exp in self.names.items():
            desc = exp.description()
            out.append((name, desc if name == exp.name else f"alias of {exp.name}: {desc}"))
        return out

    def lookup(self, export: str) -> Export | None:
        return self.names.get(export)

    def default(self) -> str:
        return next(iter(self.names), "")
