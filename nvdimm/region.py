"""The libnvdimm object model and claim state machine, in user space, without nbdkit.

One `Region` per region file holds namespaces (`namespaceR.M`), BTT personalities
(`bttR.M`), the namespace and btt seeds, and the claims between them, with the kernel's
attribute names, text formats, transitions and errno values
(Linux's drivers/nvdimm; docs/namespaces.md §2). `Region.get("namespace0.0/size")` and
`Region.set("btt0.0/namespace", "namespace0.0")` are the sysfs reads and writes;
`bind`/`unbind` are writes to the nd_pmem driver's bind/unbind files.

Two collaborators keep the model free of files and servers:
  * a *store* persists what Linux keeps in namespace labels (uuid, name, extent, lbasize,
    claim class): `MemoryStore` for tests, `AreaStore` over a `labels.LabelArea`, or
    `NoLabels` for a label-less region (one io namespace over the whole file);
  * *media* finds and lays down BTT info blocks: `MemoryMedia` for tests, `FileMedia` over
    btt_core. Enabling a namespace autodetects through it.

Every refused change raises `NdError` (an OSError whose errno is the kernel's) before
anything is changed; a change that must reach the labels is written there first, so a
failed label write leaves the model as it was. The model is not thread-safe: the control
server holds one lock around every call (the kernel's bus lock).

Deviations from Linux, each because Linux is surprising or dangerous there, are marked
"Deviation:" and listed in docs/namespace-model.md §8.
"""
from __future__ import annotations

import errno
import uuid as uuidlib

from nvdimm.attrs import (
    check_alt_name,
    parse_bool,
    parse_sector_size,
    parse_u64,
    parse_uuid,
    size_select,
)
from nvdimm.capacity import free_gaps
from nvdimm.constants import (
    BTT_INFO_OFFSET,
    BTT_SECTOR_SIZES,
    BTT_VERSION_FOR_CLASS,
    DEFAULT_ALIGN,
    HOLDER_CLASS_TEXT,
    MIN_CLAIM_SIZE,
    MIN_NAMESPACE_SIZE,
    PAGE,
    PMEM_SECTOR_SIZES,
)
from nvdimm.devices import BttDevice, Namespace
from nvdimm.errors import NdError
from nvdimm.invariants import check_invariants
from nvdimm.labels import LabelError, NamespaceLabel
from nvdimm.stores import persisted_claim_class


class Region:
    """regionR and everything in it. See the module docstring."""

    def __init__(self, store, media, *, region_id: int = 0, read_only: bool = False,
                 autobind: bool = True):
        self.store, self.media, self.id = store, media, region_id
        self.name = f"region{region_id}"
        self.size = store.size
        self.labelled = store.labelled
        self.read_only = read_only
        self.forced_read_only = read_only  # read-only media: writing read_only 0 is refused
        self.align = DEFAULT_ALIGN if self.size >= DEFAULT_ALIGN else PAGE
        self.enabled = False
        self.path = ""  # the region file, when opened from one (nvdimm/regionfile.py)
        self.namespaces: dict[str, Namespace] = {}
        self.btts: dict[str, BttDevice] = {}
        self.namespace_seed: Namespace | None = None
        self.btt_seed: BttDevice | None = None
        self.init_namespaces = (0, 0)
        self.probe_errors: dict[str, NdError] = {}  # autobind failures at the last enable
        # Deviation: a namespace's autodetected BTT gets the name it had last time when that
        # name is free, so exports and scripts keep working across disable/enable.
        self._personality_names: dict[str, str] = {}
        self.enable(autobind=autobind)

    # -- names and lookup

    def _free_id(self, taken) -> int:
        ids = {d.id for d in taken}
        return next(i for i in range(len(ids) + 1) if i not in ids)  # lowest free, like an ida

    def _new_namespace(self, kind: str, **fields) -> Namespace:
        dev_id = self._free_id(self.namespaces.values())
        ns = Namespace(f"namespace{self.id}.{dev_id}", dev_id, kind, **fields)
        self.namespaces[ns.name] = ns
        return ns

    def _new_btt(self, name: str | None = None) -> BttDevice:
        if name is None or name in self.btts:
            name = f"btt{self.id}.{self._free_id(self.btts.values())}"
        btt = BttDevice(name, int(name.rsplit(".", 1)[1]))
        self.btts[name] = btt
        return btt

    def device(self, name: str):
        """The region, a namespace or a btt by name; ENODEV names what exists."""
        if name == self.name:
            return self
        dev = self.namespaces.get(name) or self.btts.get(name)
        if dev is None:
            raise NdError(errno.ENODEV, f"no device {name!r} in {self.name}; devices: "
                          f"{', '.join(self.device_names())}")
        return dev

    def device_names(self) -> list[str]:
        return [self.name, *self.namespaces, *self.btts]

    # -- region enable / disable (rows 17, 18)

    def enable(self, autobind: bool = True) -> None:
        """Registers the namespaces the labels describe (or the io namespace) and the seeds;
        with `autobind`, enables every configured namespace as the kernel's autoprobe does,
        recording (not raising) each failure in probe_errors."""
        if self.enabled:
            return
        self.enabled = True
        if self.labelled:
            for label in sorted(self.store.load(), key=lambda label: label.offset):
                self._new_namespace("pmem", offset=label.offset, size=label.size,
                                    uuid=label.uuid, alt_name=label.name,
                                    sector_size=label.sector_size,
                                    claim_class=label.claim_class)
            self.namespace_seed = self._new_namespace("pmem")
        else:
            self._new_namespace("io", size=self.size)
        self.probe_errors = {}
        if autobind:
            for ns in [ns for ns in self.namespaces.values() if ns.configured]:
                try:
                    self.bind(ns.name)
                except NdError as e:
                    self.probe_errors[ns.name] = e
        # The btt seed comes last so that autodetected BTTs can take back their old names.
        self.btt_seed = self._new_btt()
        active = sum(1 for ns in self.namespaces.values() if ns.active_mode)
        self.init_namespaces = (active, sum(ns.configured for ns in self.namespaces.values()))

    def disable(self) -> None:
        """Unregisters every child: bindings and claims are dropped, seeds become empty."""
        self.namespaces.clear()
        self.btts.clear()
        self.namespace_seed = self.btt_seed = None
        self.enabled = False

    # -- capacity

    def _extents(self, exclude: Namespace | None = None) -> list[tuple[int, int]]:
        used = [(ns.offset, ns.size) for ns in self.namespaces.values()
                if ns.kind == "pmem" and ns.size and ns is not exclude]
        return sorted(used + self.store.reserved_extents())

    def _free_gaps(self, exclude: Namespace | None = None) -> list[tuple[int, int]]:
        return free_gaps(self._extents(exclude), self.size, self.align)

    @property
    def available_size(self) -> int:
        if not self.labelled:
            return 0
        return self.size - sum(length for _, length in self._extents())

    @property
    def max_available_extent(self) -> int:
        if not self.labelled:
            return 0
        return max((length for _, length in self._free_gaps()), default=0)

    def _place(self, ns: Namespace, new_size: int) -> int:
        """The offset for `ns` at `new_size`: grow or shrink in place, else first fit."""
        if ns.size and ns.offset + new_size <= self.size and all(
                start >= ns.offset + new_size or start + length <= ns.offset
                for start, length in self._extents(exclude=ns)):
            return ns.offset
        if ns.size:
            raise NdError(errno.ENOSPC, f"cannot grow {ns.name} to {new_size} bytes in place "
                          f"(pmem namespaces are contiguous); largest free extent is "
                          f"{self.max_available_extent}")
        for start, length in self._free_gaps(exclude=ns):
            if length >= new_size:
                return start
        raise NdError(errno.ENOSPC, f"{new_size} bytes requested; {self.name} has "
                      f"{self.available_size} available, largest free extent "
                      f"{self.max_available_extent}")

    def check_size(self, name: str, new_size: int) -> int:
        """Raises what writing `new_size` to name/size would (EINVAL, ENOSPC) without
        changing anything, so that a verb can refuse before it destroys data; returns
        the offset the namespace would have, so a BTT can be laid there first."""
        ns = self.device(name)
        if not isinstance(ns, Namespace) or ns.kind != "pmem":
            raise NdError(errno.ENXIO, f"{name} is not a labelled namespace; its size is fixed")
        if new_size <= 0 or new_size % self.align:
            raise NdError(errno.EINVAL, f"size {new_size} is not a positive multiple of "
                          f"{self.name}'s align {self.align:#x} ({self.align} bytes)")
        return self._place(ns, new_size) if new_size != ns.size else ns.offset

    # -- label write-through

    def _labels(self, overrides: dict | None = None) -> list[NamespaceLabel]:
        """The label list for the current namespaces, with `overrides` = {ns: {field: v}}."""
        out = []
        for ns in self.namespaces.values():
            f = {**vars(ns), **(overrides or {}).get(ns, {})}
            if ns.kind == "pmem" and f["uuid"] is not None and f["size"] > 0:
                out.append(NamespaceLabel(
                    uuid=f["uuid"], name=f["alt_name"], offset=f["offset"], size=f["size"],
                    lbasize=f["sector_size"],
                    claim_class=persisted_claim_class(f["claim_class"], self.store.version)))
        return out

    def _change(self, ns: Namespace, **fields) -> None:
        """Applies `fields` to ns, writing the labels first when they change, so that a
        failed label write changes nothing."""
        before = self._labels()
        after = self._labels({ns: fields})
        if self.labelled and [label.key() for label in before] != [label.key() for label in after]:
            try:
                self.store.save(after)
            except LabelError as e:
                raise NdError(e.errno, f"{ns.name}: label update failed: {e.message}") from None
            except OSError as e:
                raise NdError(e.errno or errno.EIO, f"{ns.name}: label update failed: "
                              f"{e.strerror or e}") from None
        for key, value in fields.items():
            setattr(ns, key, value)

    # -- attribute access (sysfs reads and writes)

    def get(self, path: str) -> str:
        """Reads `device/attribute`, e.g. "namespace0.0/sector_size" -> "[512] 4096"."""
        dev, attr = self._split(path)
        getter = self._attributes(dev).get(attr, (None, None))[0]
        if getter is None:
            self._no_attribute(dev, attr)
        return getter(dev)

    def set(self, path: str, value: str) -> None:
        """Writes `device/attribute`, e.g. set("namespace0.0/alt_name", "db")."""
        dev, attr = self._split(path)
        table = self._attributes(dev)
        if attr not in table:
            self._no_attribute(dev, attr)
        setter = table[attr][1]
        if setter is None:
            raise NdError(errno.EACCES, f"{path} is read-only")
        if not isinstance(value, str):
            raise NdError(errno.EINVAL, f"{path}: the value must be text")
        if dev is self:
            setter(self, value)
        else:
            setter(self, dev, value)

    def _split(self, path: str):
        if not isinstance(path, str) or path.count("/") != 1:
            raise NdError(errno.EINVAL, f"{path!r}: expected DEVICE/ATTRIBUTE, e.g. "
                          "namespace0.0/size")
        name, attr = path.split("/")
        return self.device(name), attr

    def _no_attribute(self, dev, attr: str):
        raise NdError(errno.ENOENT, f"{dev.name} has no attribute {attr!r}; attributes: "
                      f"{', '.join(self._attributes(dev))}")

    def _attributes(self, dev) -> dict:
        """name -> (getter, setter or None) for this device, visibility applied. Region
        setters take (region, text); device setters (region, device, text)."""
        if dev is self:
            return self._region_attributes()
        if isinstance(dev, BttDevice):
            return BTT_ATTRIBUTES
        if dev.kind == "io":  # label-less: fewer attributes, and size is read-only
            attrs = {k: v for k, v in NAMESPACE_ATTRIBUTES.items() if k in IO_VISIBLE}
            attrs["size"] = (attrs["size"][0], None)
            return attrs
        return NAMESPACE_ATTRIBUTES

    def _region_attributes(self) -> dict:
        attrs = {
            "size": (lambda r: str(r.size), None),
            "nstype": (lambda r: "5" if r.labelled else "4", None),
            "devtype": (lambda r: "nd_pmem", None),
            "namespace_seed": (lambda r: r.namespace_seed.name if r.namespace_seed else "",
                               None),
            "btt_seed": (lambda r: r.btt_seed.name if r.btt_seed else "", None),
            "read_only": (lambda r: str(int(r.read_only)), Region._set_read_only),
            "init_namespaces": (Region._get_init_namespaces, None),
            "mappings": (lambda r: "1", None),
            "mapping0": (lambda r: f"nmem{r.id},0,{r.size},0", None),
        }
        if self.labelled:  # the kernel shows these only when the DIMMs support labels
            attrs.update({
                "align": (lambda r: f"{r.align:#x}", Region._set_align),
                "available_size": (lambda r: str(r.available_size), None),
                "max_available_extent": (lambda r: str(r.max_available_extent), None),
            })
        return attrs

    # -- region attribute handlers

    def _set_read_only(self, value: str) -> None:
        read_only = parse_bool(value)
        if not read_only and self.forced_read_only:
            raise NdError(errno.EROFS, f"{self.name} is read-only for good: its file is not "
                          "writable, or the server was started read-only")
        self.read_only = read_only

    def uuid_owner(self, value: uuidlib.UUID, ns_name: str) -> str | None:
        """The device other than ns_name that uses uuid `value`, if any."""
        return self._uuid_in_use(value, self.namespaces.get(ns_name))

    def _set_align(self, value: str) -> None:
        align = parse_u64(value)
        if align < PAGE or align & (align - 1) or align > self.size:
            raise NdError(errno.EINVAL, f"align {value.strip()}: must be a power of two between "
                          f"{PAGE:#x} and the region size {self.size:#x}")
        self.align = align

    def _get_init_namespaces(self) -> str:
        if not self.enabled:
            raise NdError(errno.ENXIO, f"{self.name} is disabled")
        return "%d/%d" % self.init_namespaces

    # -- namespace attribute handlers

    @staticmethod
    def _refuse_if_busy(ns: Namespace, what: str) -> None:
        if ns.claim is not None:
            raise NdError(errno.EBUSY, f"{ns.name} is claimed by {ns.claim.name}; its {what} "
                          f"is frozen until {ns.claim.name}/namespace is cleared")
        if ns.bound:
            raise NdError(errno.EBUSY, f"{ns.name} is enabled; disable it before changing "
                          f"its {what}")

    def _uuid_in_use(self, value: uuidlib.UUID, ns: Namespace | None) -> str | None:
        for other in self.namespaces.values():
            if other is not ns and other.uuid == value:
                return other.name
        for btt in self.btts.values():
            if btt.uuid == value:
                return btt.name
        return None

    def _set_ns_uuid(self, ns: Namespace, value: str) -> None:
        self._refuse_if_busy(ns, "uuid")
        new_uuid = parse_uuid(value)
        if new_uuid == ns.uuid:
            return
        owner = self._uuid_in_use(new_uuid, ns)
        if owner:
            raise NdError(errno.EINVAL, f"uuid {new_uuid} is already used by {owner}")
        self._change(ns, uuid=new_uuid)  # with a size, the old label is reaped for the new

    def _set_ns_size(self, ns: Namespace, value: str) -> None:
        self._refuse_if_busy(ns, "size")
        new_size = parse_u64(value)
        if ns.uuid is None:
            raise NdError(errno.ENXIO, f"{ns.name} has no uuid; write {ns.name}/uuid first")
        if new_size % self.align:
            raise NdError(errno.EINVAL, f"size {new_size} is not a multiple of {self.name}'s "
                          f"align {self.align:#x} ({self.align} bytes)")
        if new_size == 0:
            # Capacity freed, labels deleted, uuid cleared (size_store).
            self._change(ns, size=0, offset=0, uuid=None)
            if ns is not self.namespace_seed and ns.id != 0:
                del self.namespaces[ns.name]  # N5: the device is unregistered
            return
        if new_size == ns.size:
            return
        if new_size - ns.size > self.available_size:
            raise NdError(errno.ENOSPC, f"{new_size} bytes requested; {self.name} has "
                          f"{self.available_size} available")
        self._change(ns, size=new_size, offset=self._place(ns, new_size))

    def _set_ns_alt_name(self, ns: Namespace, value: str) -> None:
        self._refuse_if_busy(ns, "alt_name")
        self._change(ns, alt_name=check_alt_name(value))

    def _set_ns_sector_size(self, ns: Namespace, value: str) -> None:
        self._refuse_if_busy(ns, "sector_size")
        self._change(ns, sector_size=parse_sector_size(value, PMEM_SECTOR_SIZES))

    def _set_ns_holder_class(self, ns: Namespace, value: str) -> None:
        self._refuse_if_busy(ns, "holder_class")
        self._change(ns, claim_class=self._claim_class(ns, value))

    def _claim_class(self, ns: Namespace, value: str) -> str:
        text = value.strip()
        if text == "btt":
            # v1.1 labels mean BTT 1.1 at +4 KiB; v1.2 labels mean BTT 2.0 at 0 (§2.1).
            claim_class = "btt" if self.store.version == "1.1" else "btt2"
        elif text in ("", "pfn", "dax"):
            claim_class = text or "none"
        else:
            raise NdError(errno.EINVAL, f"holder_class {text!r}; valid: btt, pfn, dax, or "
                          "empty for none")
        if ns.kind == "io":
            # Deviation: Linux changes the in-memory class and then fails ENXIO (no label to
            # update); we refuse without changing anything.
            raise NdError(errno.ENXIO, f"{ns.name} is label-less; it has no label to record "
                          "a holder class in")
        return claim_class

    def redefine(self, name: str, *, uuid: str, alt_name: str, sector_size: str,
                 holder_class: str, size: int) -> None:
        """Gives a configured, disabled namespace a new identity in ONE label write, the
        commit point of a reconfigure: the writes of uuid, alt_name, sector_size,
        holder_class and size one by one would each commit a label, and a crash between
        them would leave a namespace that is neither the old one nor the new one."""
        ns = self.device(name)
        if not isinstance(ns, Namespace) or not ns.configured or ns.kind != "pmem":
            raise NdError(errno.ENXIO, f"{name} is not a configured labelled namespace")
        self._refuse_if_busy(ns, "identity")
        new_uuid = parse_uuid(uuid)
        owner = self._uuid_in_use(new_uuid, ns)
        if owner:
            raise NdError(errno.EINVAL, f"uuid {new_uuid} is already used by {owner}")
        fields = dict(uuid=new_uuid, alt_name=check_alt_name(alt_name),
                      sector_size=parse_sector_size(sector_size, PMEM_SECTOR_SIZES),
                      claim_class=self._claim_class(ns, holder_class))
        offset = self.check_size(name, size)
        self._change(ns, size=size, offset=offset, **fields)

    def _set_ns_force_raw(self, ns: Namespace, value: str) -> None:
        ns.force_raw = parse_bool(value)  # no busy check: consulted at the next enable

    # -- btt attribute handlers

    @staticmethod
    def _refuse_if_btt_bound(btt: BttDevice, what: str) -> None:
        if btt.bound:
            raise NdError(errno.EBUSY, f"{btt.name} is enabled; its {what} cannot change "
                          "while it serves")

    def _set_btt_uuid(self, btt: BttDevice, value: str) -> None:
        self._refuse_if_btt_bound(btt, "uuid")
        btt.uuid = parse_uuid(value)

    def _set_btt_sector_size(self, btt: BttDevice, value: str) -> None:
        self._refuse_if_btt_bound(btt, "sector_size")
        btt.sector_size = parse_sector_size(value, BTT_SECTOR_SIZES)

    def _set_btt_namespace(self, btt: BttDevice, value: str) -> None:
        """Rows 8, 9 (claim) and 13 (detach with an empty string)."""
        self._refuse_if_btt_bound(btt, "namespace")
        name = value.strip()
        if not name:
            self._detach(btt)
            return
        if btt.ndns is not None:
            if btt.ndns.name == name:
                return
            raise NdError(errno.EBUSY, f"{btt.name} already holds {btt.ndns.name}; write an "
                          f"empty {btt.name}/namespace first")
        if not name.startswith("namespace"):
            raise NdError(errno.EINVAL, f"{name!r} is not a namespace name (namespaceR.M)")
        ns = self.namespaces.get(name)
        if ns is None:
            raise NdError(errno.ENODEV, f"no {name} in {self.name}; namespaces: "
                          f"{', '.join(self.namespaces)}")
        if ns.size < MIN_CLAIM_SIZE:
            raise NdError(errno.ENXIO, f"{name} is {ns.size} bytes; a BTT needs at least "
                          f"{MIN_CLAIM_SIZE} (16 MiB)")
        if ns.claim_class not in BTT_VERSION_FOR_CLASS:
            raise NdError(errno.EBUSY, f"{name}'s holder_class is "
                          f"{HOLDER_CLASS_TEXT[ns.claim_class]!r}; only btt or empty lets a "
                          "BTT claim it")
        if ns.claim is not None:
            raise NdError(errno.EBUSY, f"{name} is already claimed by {ns.claim.name}")
        btt.ndns, ns.claim = ns, btt
        btt.claimed_identity = ns.identity()

    def _detach(self, btt: BttDevice) -> None:
        if btt.ndns is not None:
            btt.ndns.claim = None
            btt.ndns = btt.claimed_identity = None
        if btt is self.btt_seed:
            btt.uuid = btt.sector_size = None  # a seed is reset
        else:
            del self.btts[btt.name]  # any other personality without a namespace is deleted

    # -- binding (the nd_pmem driver's bind and unbind files)

    def bind(self, name: str) -> str:
        """Enables a namespace or a btt; returns the device that ends up serving.

        Enabling a namespace autodetects a BTT (unless force_raw) and, if one is found,
        binds a new btt personality to it instead -- the kernel's namespace probe then
        reports ENXIO on purpose; we report success and name the btt, as ndctl does."""
        dev = self.device(name)
        if dev is self:
            raise NdError(errno.EINVAL, "bind takes a namespace or btt name; use "
                          "enable()/disable() for the region")
        if dev.bound:
            raise NdError(errno.EBUSY, f"{name} is already enabled")
        if isinstance(dev, BttDevice):
            self._bind_btt(dev)
            return dev.name
        return self._bind_namespace(dev)

    def unbind(self, name: str) -> None:
        """Disables a namespace (rows 7, 10) or a btt (row 12). The btt keeps its claim."""
        dev = self.device(name)
        if dev is self or not dev.bound:
            raise NdError(errno.ENODEV, f"{name} is not enabled")
        dev.bound = False

    def _common_probe(self, ns: Namespace) -> None:
        """nvdimm_namespace_common_probe: what any driver needs from a namespace."""
        if ns.size < MIN_NAMESPACE_SIZE:
            raise NdError(errno.ENODEV, f"{ns.name} has no capacity; write its uuid and size")
        if ns.kind == "pmem" and ns.uuid is None:
            raise NdError(errno.ENODEV, f"{ns.name} has no uuid")

    def _probe_btt(self, ns: Namespace, version: str) -> dict | None:
        info = self.media.probe(ns.offset, ns.size, version)
        if info is None:
            return None
        parent = info.get("parent_uuid")
        if parent is not None and parent.int != 0 and parent != ns.uuid:
            # Deviation: Linux ignores such a BTT and exposes its bytes raw, where the first
            # write destroys it; we refuse.
            raise NdError(errno.EUCLEAN, f"{ns.name} holds a BTT {version} whose parent_uuid "
                          f"{parent} is not the namespace's uuid {ns.uuid}; set force_raw=1 "
                          "to reach the raw bytes, or write the matching uuid back")
        return info

    @staticmethod
    def autodetect_versions(ns: Namespace) -> list[str]:
        """The BTT versions enabling `ns` looks for, in order: none with force_raw or a
        pfn/dax/unknown claim class."""
        version = BTT_VERSION_FOR_CLASS.get(ns.claim_class)
        if ns.force_raw or version is None:
            return []
        if ns.claim_class == "none":
            # Deviation: Linux looks only for a 1.1 here and would expose a BTT 2.0 at
            # offset 0 raw, where the first write destroys it; we serve it.
            return [version, "2.0"]
        return [version]

    def _bind_namespace(self, ns: Namespace) -> str:
        """Rows 5, 6 and 15."""
        if ns.claim is not None:
            raise NdError(errno.ENXIO, f"{ns.name} is claimed by {ns.claim.name}; enable "
                          f"{ns.claim.name} instead")
        self._common_probe(ns)
        info = None
        for version in self.autodetect_versions(ns):
            # Deviation: a damaged BTT (EUCLEAN from the probe) refuses the enable instead
            # of exposing the BTT's map and log raw.
            info = self._probe_btt(ns, version)
            if info is not None:
                break
        if info is None and ns.claim_class in ("btt", "btt2") and not ns.force_raw:
            # Deviation: Linux attaches the raw disk when the claim class names a BTT but
            # none is found; those bytes are BTT metadata (a create or reconfigure cut short,
            # a wiped info block), and the first raw write would scramble them. Refused like
            # the raw probe of a claimed namespace (ENXIO); force_raw=1 reaches the bytes.
            raise NdError(errno.ENXIO, f"{ns.name}'s label claims it for a BTT "
                          f"({HOLDER_CLASS_TEXT[ns.claim_class]}, {ns.claim_class}) but no valid "
                          f"BTT {self.autodetect_versions(ns)[0]} is there; it is not served "
                          "raw. Recreate it (create-namespace -e), or set force_raw=1 to reach "
                          "the raw bytes")
        was_seed = ns is self.namespace_seed
        if info is None:
            ns.bound = True
            served = ns.name
        else:
            btt = self._new_btt(self._personality_names.get(ns.name))
            btt.uuid, btt.sector_size, btt.info = info["uuid"], info["sector_size"], info
            btt.ndns, ns.claim, btt.bound = ns, btt, True
            btt.claimed_identity = ns.identity()
            self._personality_names[ns.name] = btt.name
            served = btt.name
        if was_seed:
            self.namespace_seed = self._new_namespace("pmem")
        return served

    def _bind_btt(self, btt: BttDevice) -> None:
        """Row 11, with the refusals Linux lacks for foreign, mismatched or damaged BTTs."""
        ns = btt.ndns
        if ns is None:
            raise NdError(errno.ENODEV, f"{btt.name} has no namespace; write "
                          f"{btt.name}/namespace first")
        if ns.bound:
            raise NdError(errno.EBUSY, f"{ns.name} is enabled raw; disable it before "
                          f"enabling {btt.name}")
        self._common_probe(ns)
        if btt.uuid is None or btt.sector_size is None:
            missing = [a for a in ("uuid", "sector_size") if getattr(btt, a) is None]
            raise NdError(errno.ENODEV, f"{btt.name} is not configured: write "
                          f"{' and '.join(btt.name + '/' + a for a in missing)}")
        version = BTT_VERSION_FOR_CLASS.get(ns.claim_class)
        if version is None:
            raise NdError(errno.ENXIO, f"{ns.name}'s holder_class "
                          f"{HOLDER_CLASS_TEXT[ns.claim_class]!r} does not admit a BTT")
        if ns.size < MIN_CLAIM_SIZE + BTT_INFO_OFFSET[version]:
            raise NdError(errno.ENXIO, f"{ns.name} is {ns.size} bytes; a BTT {version} needs "
                          f"{MIN_CLAIM_SIZE + BTT_INFO_OFFSET[version]}")
        info = self._probe_btt(ns, version)
        if info is None:
            other = "2.0" if version == "1.1" else "1.1"
            stray = self._probe_btt(ns, other)
            if stray is not None:
                # Deviation: a fresh layout would overwrite this BTT's metadata and data.
                raise NdError(errno.EEXIST, f"{ns.name} holds a BTT {other}, but its "
                              f"holder_class asks for {version}; reconfigure it "
                              "(create-namespace -e) to start afresh")
            if self.read_only:
                raise NdError(errno.ENOMEM, f"{self.name} is read-only and {ns.name} has no "
                              "BTT to reuse; a new layout would have to be written")
            parent = ns.uuid if ns.kind == "pmem" else uuidlib.UUID(int=0)
            info = self.media.format(ns.offset, ns.size, version=version, uuid=btt.uuid,
                                     parent_uuid=parent, sector_size=btt.sector_size)
        elif info["uuid"] != btt.uuid or info["sector_size"] != btt.sector_size:
            # Deviation: the kernel silently reuses a BTT whatever btt's configuration says.
            raise NdError(errno.EEXIST, f"{ns.name} already holds a BTT (uuid {info['uuid']}, "
                          f"{info['sector_size']}-byte sectors) that differs from "
                          f"{btt.name}'s configuration; write those values to {btt.name} to "
                          "use it, or reconfigure the namespace to start afresh")
        btt.info, btt.bound = info, True
        self._personality_names[ns.name] = btt.name
        if btt is self.btt_seed:
            self.btt_seed = self._new_btt()
        if ns is self.namespace_seed:
            self.namespace_seed = self._new_namespace("pmem")

    # -- the §3.3 invariants

    def check_invariants(self) -> None:
        """Raises AssertionError naming the first broken invariant (nvdimm/invariants.py)."""
        check_invariants(self)


# Attribute tables: name -> (getter(dev), setter(region, dev, text) or None for read-only).

def _ns_sector_size(ns: Namespace) -> str:
    return size_select(ns.sector_size, PMEM_SECTOR_SIZES)


def _ns_resource(ns: Namespace) -> str:
    if ns.size == 0:
        raise NdError(errno.ENXIO, f"{ns.name} has no capacity")
    return f"{ns.offset:#x}"  # the file offset plays the physical address


def _btt_size(btt: BttDevice) -> str:
    if not btt.bound or btt.info is None:
        raise NdError(errno.ENXIO, f"{btt.name} is not enabled")
    return str(btt.info["size"])


NAMESPACE_ATTRIBUTES = {
    "nstype": (lambda ns: "5" if ns.kind == "pmem" else "4", None),
    "devtype": (lambda ns: f"nd_namespace_{ns.kind}", None),
    "modalias": (lambda ns: "nd:t5" if ns.kind == "pmem" else "nd:t4", None),
    "size": (lambda ns: str(ns.size), Region._set_ns_size),
    "uuid": (lambda ns: str(ns.uuid) if ns.uuid else "", Region._set_ns_uuid),
    "alt_name": (lambda ns: ns.alt_name, Region._set_ns_alt_name),
    "sector_size": (_ns_sector_size, Region._set_ns_sector_size),
    "dpa_extents": (lambda ns: "1" if ns.size else "0", None),
    "resource": (_ns_resource, None),
    "holder": (lambda ns: ns.claim.name if ns.claim else "", None),
    "holder_class": (lambda ns: HOLDER_CLASS_TEXT[ns.claim_class], Region._set_ns_holder_class),
    "force_raw": (lambda ns: str(int(ns.force_raw)), Region._set_ns_force_raw),
    "mode": (lambda ns: "safe" if ns.claim else "raw", None),
}
IO_VISIBLE = ("nstype", "devtype", "modalias", "size", "mode", "holder", "holder_class",
              "force_raw", "resource")
BTT_ATTRIBUTES = {
    "devtype": (lambda b: "nd_btt", None),
    "namespace": (lambda b: b.ndns.name if b.ndns else "", Region._set_btt_namespace),
    "uuid": (lambda b: str(b.uuid) if b.uuid else "", Region._set_btt_uuid),
    "sector_size": (lambda b: size_select(b.sector_size, BTT_SECTOR_SIZES),
                    Region._set_btt_sector_size),
    "size": (_btt_size, None),
    "log_zero_flags": (lambda b: "Y", None),
}
