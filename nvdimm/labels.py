"""Persistent namespace labels: the Linux/UEFI label storage area, where QEMU keeps it.

A labelled region file is laid out like the backing file of a QEMU emulated NVDIMM
(docs/namespaces.md §1.1): `[pmem area, P bytes][label storage area, L bytes]`.
A namespace is an extent of the pmem area; its label's `dpa` *is* its file offset. The label
area holds two index blocks and `nslot` label slots (§1). Everything is little-endian.

Crash safety is Linux's (§3.1): new labels only go into slots that are free in the current
index, and one write of the *other* index block, with the next sequence number, commits the
whole change. A torn or missing index write leaves that block invalid or older, so the old
index stays current; a torn label write lands in a slot nobody references.

The bytes are untrusted input (a guest, or anybody, may have written them): every field is
checked before use, and damage surfaces as `LabelError` with an errno and a message.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import struct
import uuid as uuidlib

from btt_core import Io
from btt_core.engine import fletcher64
from nvdimm.constants import PAGE, PMEM_SECTOR_SIZES
from nvdimm.errors import NdError

INDEX_SIGNATURE = b"NAMESPACE_INDEX\0"
INDEX_HEADER_SIZE = 72
INDEX_ALIGN = 256
INDEX_HEADER = struct.Struct("<16s3sBIQQQQIHHQ")  # up to and including the checksum
INDEX_CHECKSUM_OFFSET = 0x40

# The first 124 bytes are common to v1.1 and v1.2 (0x7C..0x7F are padding in v1.1).
LABEL_COMMON = struct.Struct("<16s64sIHHQQQQI")
LABEL_V12_TAIL = struct.Struct("<B3s16s16s88sQ")  # align, reserved, type, abstraction, -, csum
LABEL_CHECKSUM_OFFSET = 0xF8
LABEL_SIZES = {"1.1": 128, "1.2": 256}
NAME_FIELD = 64  # NUL-terminated: at most 63 bytes of name

DEFAULT_LABEL_AREA = 128 * 1024  # QEMU's minimum label-size, and the conventional one
MIN_LABEL_AREA = DEFAULT_LABEL_AREA

# GUIDs are stored in mixed-endian GUID order, hence bytes_le (label-format.md §2.1).
PMEM_TYPE_GUID = uuidlib.UUID("66f0d379-b4f3-4074-ac43-0d3318b78cdb").bytes_le
CLAIM_CLASS_GUIDS = {
    "none": bytes(16),
    "btt": uuidlib.UUID("8aed63a2-29a2-4c66-8b12-f05d15d3922a").bytes_le,
    "btt2": uuidlib.UUID("18633bfc-1735-4217-8ac9-17239282d3f8").bytes_le,
    "pfn": uuidlib.UUID("266400ba-fb9f-4677-bcb0-968f11d0d225").bytes_le,
    "dax": uuidlib.UUID("97a86d9c-3cdd-4eda-986f-5068b4f80088").bytes_le,
}
CLAIM_CLASS_OF_GUID = {guid: name for name, guid in CLAIM_CLASS_GUIDS.items()}


class LabelError(NdError):
    """A label area that cannot be used, or an update that cannot be written."""


# ---- arithmetic shared by readers and writers ---------------------------------------------

def checksum_with_field_zeroed(block: bytes, field_offset: int) -> int:
    return fletcher64(block[:field_offset] + bytes(8) + block[field_offset + 8:])


def area_geometry(area_size: int, label_size: int) -> tuple[int, int]:
    """(index_size, nslot) exactly as Linux derives them from config_size (§1.2)."""
    per_label = area_size // label_size
    blocks = -(-(INDEX_HEADER_SIZE + -(-per_label // 8)) // INDEX_ALIGN)
    nslot = (area_size - 2 * INDEX_ALIGN * blocks) // label_size
    index_size = -(-(INDEX_HEADER_SIZE + -(-nslot // 8)) // INDEX_ALIGN) * INDEX_ALIGN
    if nslot < 2 or 2 * index_size > area_size - nslot * label_size:
        raise LabelError(errno.EINVAL, f"a {area_size}-byte label area is too small for "
                         f"{label_size}-byte labels")
    return index_size, nslot


def next_seq(seq: int) -> int:
    """The sequence cycle 1 -> 2 -> 3 -> 1; only the low two bits count (§1.5)."""
    return {1: 2, 2: 3, 3: 1}[seq & 3]


def current_index(seq0: int | None, seq1: int | None) -> int:
    """Which of two index blocks is current; None marks an invalid block (§1.5)."""
    if seq0 is None:
        return 1
    if seq1 is None:
        return 0
    a, b = seq0 & 3, seq1 & 3
    return 1 if a == b or b == next_seq(a) else 0


def qemu_cookies(dimm_slot: int = 0) -> tuple[int, int]:
    """(cookie1, cookie2): the interleave-set cookies of a single QEMU NVDIMM (§3.3)."""
    serial = 0x123456 + dimm_slot
    cookie1 = fletcher64(struct.pack("<QII", 0, serial, 0))
    cookie2 = fletcher64(struct.pack("<QIHHB31s", 0, serial, 0x8086, 0, 0, bytes(31)))
    return cookie1, cookie2


def pmem_size_for(file_size: int, area_size: int) -> int:
    """P: the guest-visible pmem bytes in front of the label area (§4.1)."""
    return (file_size - area_size) // PAGE * PAGE


# ---- the records ---------------------------------------------------------------------------

@dataclasses.dataclass
class NamespaceLabel:
    """One namespace as its label describes it. `offset` (= dpa) is a file offset."""

    uuid: uuidlib.UUID
    name: str = ""
    offset: int = 0
    size: int = 0
    lbasize: int = 512
    claim_class: str = "none"  # none, btt, btt2, pfn, dax, or unknown (GUID kept verbatim)
    flags: int = 0
    slot: int | None = None  # where it was read from; ignored when writing
    abstraction_guid: bytes | None = None  # only consulted for claim_class "unknown"

    @property
    def sector_size(self) -> int:
        # Linux reads 0 and 512 as 512 and anything but 4096 as 512 (with a WARN).
        return 4096 if self.lbasize == 4096 else 512

    def key(self) -> tuple:
        """The fields a write stores: equal keys mean the label need not be rewritten."""
        guid = self.abstraction_guid if self.claim_class == "unknown" else None
        return (self.uuid, self.name, self.offset, self.size, self.lbasize, self.claim_class,
                guid)


def pack_label(label: NamespaceLabel, slot: int, version: str, cookie: int,
               flags: int = 0) -> bytes:
    """The label_size bytes of `label` for slot `slot` (§2.1)."""
    name = label.name.encode()
    common = LABEL_COMMON.pack(label.uuid.bytes, name, flags, 1, 0, cookie, label.lbasize,
                               label.offset, label.size, slot)
    if version == "1.1":
        return common + bytes(4)
    if label.claim_class == "unknown":
        abstraction = label.abstraction_guid or bytes(16)
    else:
        abstraction = CLAIM_CLASS_GUIDS[label.claim_class]
    raw = common + LABEL_V12_TAIL.pack(0, bytes(3), PMEM_TYPE_GUID, abstraction, bytes(88), 0)
    checksum = fletcher64(raw)
    return raw[:LABEL_CHECKSUM_OFFSET] + struct.pack("<Q", checksum)


@dataclasses.dataclass
class IndexBlock:
    """The decoded fields of one valid index block."""

    seq: int
    nslot: int
    free: list[bool]  # free[i]: slot i holds no live label


def pack_index(block_no: int, index_size: int, version: str, seq: int, nslot: int,
               free: list[bool]) -> bytes:
    """The index_size bytes of index block `block_no` (§1.3), checksum included."""
    bitmap = bytearray(-(-nslot // 8))
    for slot in range(nslot):
        if free[slot]:
            bitmap[slot // 8] |= 1 << (slot % 8)
    myoff = block_no * index_size
    otheroff = (1 - block_no) * index_size
    labelsize_field = 1 if version == "1.2" else 0
    minor = 2 if version == "1.2" else 1
    header = INDEX_HEADER.pack(INDEX_SIGNATURE, bytes(3), labelsize_field, seq, myoff,
                               index_size, otheroff, 2 * index_size, nslot, 1, minor, 0)
    raw = header + bytes(bitmap)
    raw += bytes(index_size - len(raw))
    checksum = fletcher64(raw)
    return raw[:INDEX_CHECKSUM_OFFSET] + struct.pack("<Q", checksum) + raw[INDEX_HEADER_SIZE:]


def unpack_index(raw: bytes, block_no: int, area_size: int, label_size: int,
                 index_size: int) -> tuple[IndexBlock | None, str]:
    """(block, "") if `raw` is a valid index block for this probe, else (None, why)."""
    if len(raw) < index_size:
        return None, "truncated"
    (sig, _flags, labelsize_field, seq, myoff, mysize, otheroff, labeloff, nslot, major, minor,
     checksum) = INDEX_HEADER.unpack_from(raw)
    if sig != INDEX_SIGNATURE:
        return None, "no signature"
    if major != 1 or minor not in (1, 2):
        return None, f"unsupported version {major}.{minor}"
    if minor >= 2:
        if labelsize_field > 1:
            return None, f"labelsize field {labelsize_field}"
        implied_label_size = 1 << (7 + labelsize_field)
    else:
        implied_label_size = 128
    # Only the two combinations Linux writes are usable: 1.1 with 128-byte labels, 1.2 with 256.
    if implied_label_size != label_size or LABEL_SIZES[f"1.{minor}"] != label_size:
        return None, f"version 1.{minor} does not use {label_size}-byte labels"
    if seq & 3 == 0:
        return None, f"sequence number {seq}"
    if myoff != block_no * index_size or otheroff != (1 - block_no) * index_size:
        return None, f"offsets {myoff}/{otheroff} do not match block {block_no}"
    if labeloff != 2 * index_size:
        return None, f"label offset {labeloff}"
    if not INDEX_HEADER_SIZE <= mysize <= index_size:
        return None, f"index size {mysize}"
    # Linux's bound, plus ours: the free bitmap must fit inside the block we checksum.
    if nslot * label_size + 2 * index_size > area_size or \
            INDEX_HEADER_SIZE + -(-nslot // 8) > index_size:
        return None, f"nslot {nslot} does not fit"
    if checksum_with_field_zeroed(raw[:index_size], INDEX_CHECKSUM_OFFSET) != checksum:
        return None, "bad checksum"
    bitmap = raw[INDEX_HEADER_SIZE:INDEX_HEADER_SIZE + -(-nslot // 8)]
    free = [bool(bitmap[i // 8] >> (i % 8) & 1) for i in range(nslot)]
    return IndexBlock(seq=seq & 3, nslot=nslot, free=free), ""


def unpack_label(raw: bytes, slot: int, version: str) -> tuple[dict | None, str]:
    """(fields, "") for a label Linux would look at, else (None, why it would skip it)."""
    (uuid_bytes, name, flags, nlabel, position, cookie, lbasize, dpa, rawsize,
     slot_field) = LABEL_COMMON.unpack_from(raw)
    if slot_field != slot:
        return None, f"slot field {slot_field}"
    fields = dict(uuid=uuidlib.UUID(bytes=uuid_bytes),
                  name=name.split(b"\0", 1)[0].decode(errors="replace"),
                  flags=flags, nlabel=nlabel, position=position, cookie=cookie, lbasize=lbasize,
                  offset=dpa, size=rawsize, type_guid=PMEM_TYPE_GUID, abstraction=bytes(16))
    if version == "1.2":
        (_align, _reserved, type_guid, abstraction, _reserved2,
         checksum) = LABEL_V12_TAIL.unpack_from(raw, LABEL_COMMON.size)
        if checksum_with_field_zeroed(raw, LABEL_CHECKSUM_OFFSET) != checksum:
            return None, "bad checksum"
        fields.update(type_guid=type_guid, abstraction=abstraction)
    return fields, ""


# ---- the label area ------------------------------------------------------------------------

class LabelArea:
    """The label storage area at the end of a region file: read, validated, updatable."""

    def __init__(self, medium, area_size: int, dimm_slot: int = 0):
        """Loads the area occupying the last `area_size` bytes of `medium`.

        Raises LabelError(ENODEV) if neither index block is valid (a label-less file, which
        Linux would show as one io namespace), EUCLEAN for labels Linux would refuse."""
        self.medium = medium
        self.area_size = area_size
        self.dimm_slot = dimm_slot
        file_size = medium.size
        if area_size < MIN_LABEL_AREA or area_size >= file_size:
            raise LabelError(errno.EINVAL, f"label area of {area_size} bytes does not fit a "
                             f"{file_size}-byte file (QEMU needs at least {MIN_LABEL_AREA})")
        self.base = file_size - area_size
        self.pmem_size = pmem_size_for(file_size, area_size)
        if self.pmem_size <= 0:
            raise LabelError(errno.EINVAL, "no pmem area in front of the label area")
        self._load()

    # -- opening and creating

    @classmethod
    def detect(cls, path, dimm_slot: int = 0, writable: bool = True) -> "LabelArea | None":
        """The label area of a region file, or None for a label-less file.

        Looks for the index signature at S - L for L = 128 KiB, 256 KiB, ... 16 MiB. A
        signature whose area fails validation is an error, not "label-less": serving the
        whole file raw would expose (and let a client overwrite) the labels."""
        medium = Io.file(path, readonly=not writable)
        try:
            file_size = medium.size
            area_size = MIN_LABEL_AREA
            while area_size <= 16 << 20 and area_size < file_size:
                # Block 1 sits at index_size, which depends on the label size being probed.
                block_offsets = {0, *(area_geometry(area_size, size)[0]
                                      for size in LABEL_SIZES.values())}
                if any(medium.read(file_size - area_size + off, 16) == INDEX_SIGNATURE
                       for off in block_offsets):
                    return cls(medium, area_size, dimm_slot)
                area_size *= 2
        except BaseException:
            medium.close()
            raise
        medium.close()
        return None

    @classmethod
    def open(cls, path, area_size: int, dimm_slot: int = 0, writable: bool = True):
        """The label area of a region file whose label size is known (`label-size=`)."""
        medium = Io.file(path, readonly=not writable)
        try:
            return cls(medium, area_size, dimm_slot)
        except BaseException:
            medium.close()
            raise

    @classmethod
    def create(cls, path, size: int, label_size: int = DEFAULT_LABEL_AREA,
               version: str = "1.2", dimm_slot: int = 0) -> "LabelArea":
        """A new sparse region file: `size` bytes of pmem followed by an empty label area.

        `size` is the region (pmem) size P; the file is P + label_size bytes, which is the
        `size=` to give QEMU's memory-backend-file. Fails with EEXIST if the file exists."""
        if size <= 0 or size % PAGE:
            raise LabelError(errno.EINVAL, f"region size {size} must be a positive multiple "
                             f"of {PAGE}")
        if version not in LABEL_SIZES:
            raise LabelError(errno.EINVAL, f"label version {version!r}; valid: 1.1, 1.2")
        if label_size < MIN_LABEL_AREA or label_size % PAGE:
            raise LabelError(errno.EINVAL, f"label area size {label_size} must be a multiple "
                             f"of {PAGE} and at least {MIN_LABEL_AREA} (QEMU's minimum)")
        index_size, nslot = area_geometry(label_size, LABEL_SIZES[version])
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, size + label_size)
            # ndctl init-labels' pair: block 0 seq 3 (current), block 1 seq 2, all slots free.
            for block_no, seq in ((0, 3), (1, 2)):
                os.pwrite(fd, pack_index(block_no, index_size, version, seq, nslot,
                                         [True] * nslot), size + block_no * index_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls.open(path, label_size, dimm_slot)

    @staticmethod
    def format_medium(medium, area_size: int, version: str = "1.2") -> None:
        """Writes an empty label area (both index blocks) at the end of `medium` (tests)."""
        index_size, nslot = area_geometry(area_size, LABEL_SIZES[version])
        base = medium.size - area_size
        medium.write(base, bytes(area_size))
        for block_no, seq in ((0, 3), (1, 2)):
            medium.write(base + block_no * index_size,
                         pack_index(block_no, index_size, version, seq, nslot, [True] * nslot))

    def close(self) -> None:
        self.medium.close()

    # -- reading

    def _load(self) -> None:
        """Finds the current index (128-byte probe first, then 256, as Linux) and its labels."""
        reasons = []
        for version, label_size in LABEL_SIZES.items():  # noqa: B007 - both kept after break
            index_size, _ = area_geometry(self.area_size, label_size)
            blocks = []
            for block_no in (0, 1):
                raw = self.medium.read(self.base + block_no * index_size, index_size)
                block, why = unpack_index(raw, block_no, self.area_size, label_size, index_size)
                blocks.append(block)
                if why != "no signature" and block is None:
                    reasons.append(f"index {block_no} ({label_size}-byte labels): {why}")
            if blocks[0] or blocks[1]:
                break
        else:
            raise LabelError(errno.ENODEV if not reasons else errno.EUCLEAN,
                             "no valid label index block at file offset "
                             f"{self.base}" + (": " + "; ".join(reasons) if reasons else ""))
        self.version = version
        self.label_size = label_size
        self.index_size = index_size
        self.current = current_index(*(b.seq if b else None for b in blocks))
        index = blocks[self.current]
        if index is None:  # current_index only picks a block that parsed
            raise LabelError(errno.EUCLEAN, "no current label index block")
        self.index: IndexBlock = index
        self.cookies = qemu_cookies(self.dimm_slot)
        self.skipped: list[str] = []  # labels Linux would skip, with the reason
        self.labels: dict[int, NamespaceLabel] = {}  # slot -> live label
        self.foreign: dict[int, NamespaceLabel] = {}  # live, but another DIMM slot's cookie
        for slot in range(self.index.nslot):
            if not self.index.free[slot]:
                self._load_slot(slot)
        self._check_set()

    def _slot_offset(self, slot: int) -> int:
        return self.base + 2 * self.index_size + slot * self.label_size

    def _load_slot(self, slot: int) -> None:
        raw = self.medium.read(self._slot_offset(slot), self.label_size)
        fields, why = unpack_label(raw, slot, self.version)
        if fields is None:
            self.skipped.append(f"slot {slot}: {why}")
            return
        # Linux refuses the whole region for these (label-format.md §3.2 rule 6).
        if fields["nlabel"] != 1 or fields["position"] != 0:
            raise LabelError(errno.EUCLEAN, f"slot {slot}: label of a {fields['nlabel']}-DIMM "
                             f"interleave set (position {fields['position']}); a region file "
                             "is one DIMM")
        if fields["type_guid"] != PMEM_TYPE_GUID:
            raise LabelError(errno.EUCLEAN, f"slot {slot}: type GUID "
                             f"{uuidlib.UUID(bytes_le=fields['type_guid'])} is not persistent "
                             "memory")
        claim_class = CLAIM_CLASS_OF_GUID.get(fields["abstraction"], "unknown")
        label = NamespaceLabel(
            uuid=fields["uuid"], name=fields["name"], offset=fields["offset"],
            size=fields["size"], lbasize=fields["lbasize"], claim_class=claim_class,
            flags=fields["flags"], slot=slot,
            abstraction_guid=fields["abstraction"] if claim_class == "unknown" else None)
        if fields["offset"] + fields["size"] > self.pmem_size or fields["size"] == 0:
            self.skipped.append(f"slot {slot}: extent [{label.offset}, +{label.size}) is "
                                f"outside the {self.pmem_size}-byte pmem area")
            return
        # cookie1 is also accepted for v1.2 labels: with one DIMM it is the altcookie.
        if fields["cookie"] not in self.cookies:
            # Linux skips the label but keeps its capacity reserved; so do we.
            self.skipped.append(f"slot {slot}: interleave-set cookie {fields['cookie']:#x} is "
                                f"not QEMU slot {self.dimm_slot}'s")
            self.foreign[slot] = label
            return
        self.labels[slot] = label

    def _check_set(self) -> None:
        seen: dict[uuidlib.UUID | None, int | None] = {}
        for label in self.labels.values():
            if label.uuid in seen:
                raise LabelError(errno.EUCLEAN, f"slots {seen[label.uuid]} and {label.slot} "
                                 f"both hold namespace {label.uuid} (conflicting extents)")
            seen[label.uuid] = label.slot
        extents = sorted((label.offset, label.offset + label.size, label.slot)
                         for label in [*self.labels.values(), *self.foreign.values()])
        for (_, end, slot_a), (start, _, slot_b) in zip(extents, extents[1:], strict=False):
            if start < end:
                raise LabelError(errno.EUCLEAN, f"the extents of slots {slot_a} and {slot_b} "
                                 "overlap")

    def namespaces(self) -> list[NamespaceLabel]:
        """The live namespaces, in file-offset order (copies: edit them freely)."""
        return [dataclasses.replace(label) for label in sorted(self.labels.values(),
                                                       key=lambda label: label.offset)]

    def reserved_extents(self) -> list[tuple[int, int]]:
        """(offset, size) of capacity held by labels we do not manage (other cookies)."""
        return sorted((label.offset, label.size) for label in self.foreign.values())

    @property
    def seq(self) -> int:
        return self.index.seq

    # -- writing

    def _validate(self, wanted: list[NamespaceLabel]) -> None:
        seen = set()
        extents = [(o, o + s, "a label of another DIMM slot") for o, s in self.reserved_extents()]
        for label in wanted:
            what = f"namespace {label.uuid}"
            if not isinstance(label.uuid, uuidlib.UUID) or label.uuid.int == 0:
                raise LabelError(errno.EINVAL, f"{what}: a label needs a non-null uuid")
            if label.uuid in seen:
                raise LabelError(errno.EINVAL, f"{what}: uuid given twice")
            seen.add(label.uuid)
            if len(label.name.encode()) >= NAME_FIELD or "\0" in label.name:
                raise LabelError(errno.EINVAL, f"{what}: name longer than {NAME_FIELD - 1} "
                                 "bytes or containing NUL")
            if label.size <= 0 or label.offset < 0 or label.offset % PAGE or label.size % PAGE:
                raise LabelError(errno.EINVAL, f"{what}: extent [{label.offset}, "
                                 f"+{label.size}) is not a non-empty run of {PAGE}-byte pages")
            if label.offset + label.size > self.pmem_size:
                raise LabelError(errno.ENOSPC, f"{what}: extent ends past the "
                                 f"{self.pmem_size}-byte pmem area")
            if label.lbasize not in PMEM_SECTOR_SIZES:
                raise LabelError(errno.EINVAL, f"{what}: lbasize {label.lbasize}; valid: "
                                 f"{', '.join(map(str, PMEM_SECTOR_SIZES))}")
            # v1.1 labels have no claim-class field: only "none" (autodetect) is expressible.
            valid_classes = ["none"] if self.version == "1.1" else \
                [*CLAIM_CLASS_GUIDS, "unknown"]
            if label.claim_class not in valid_classes:
                raise LabelError(errno.EINVAL, f"{what}: claim class {label.claim_class!r} "
                                 f"cannot be stored in v{self.version} labels; valid: "
                                 f"{', '.join(valid_classes)}")
            extents.append((label.offset, label.offset + label.size, what))
        extents.sort()
        for (_, end, a), (start, _, b) in zip(extents, extents[1:], strict=False):
            if start < end:
                raise LabelError(errno.EINVAL, f"{a} and {b} overlap")

    def update(self, wanted: list[NamespaceLabel]) -> None:
        """Makes `wanted` the live namespace list, crash-safely (label-format.md §3.1).

        Changed or new namespaces get their label written to a slot that is free in the
        current index; then the other index block is written once, with the next sequence
        number and a bitmap that frees the replaced labels. That single write commits: a
        crash before it leaves the old state, after it the new one. Labels of other DIMM
        slots and slots Linux would skip keep whatever the current index says about them.

        Deviation: Linux makes two passes (the first with the UPDATING flag, the second to
        clear it) because a multi-DIMM set needs one index write per DIMM; with one DIMM a
        single pass with flags 0 gives the same crash guarantees with half the writes."""
        self._load()  # someone (a guest) may have changed the area since we read it
        self._validate(wanted)
        by_uuid = {label.uuid: (slot, label) for slot, label in self.labels.items()}
        free = list(self.index.free)
        allocatable = [slot for slot in range(self.index.nslot) if self.index.free[slot]]
        to_write: list[tuple[int, NamespaceLabel]] = []
        kept_uuids = set()
        for label in wanted:
            old = by_uuid.get(label.uuid)
            if old and old[1].key() == label.key():
                kept_uuids.add(label.uuid)
                continue
            if not allocatable:
                raise LabelError(errno.ENOSPC, f"all {self.index.nslot} label slots are in use")
            slot = allocatable.pop(0)  # Linux takes the lowest free slot
            free[slot] = False
            to_write.append((slot, label))
        for label_uuid, (slot, _) in by_uuid.items():
            if label_uuid not in kept_uuids:
                free[slot] = True  # replaced or deleted: its bytes stay, the bitmap forgets
        if not to_write and free == self.index.free:
            return
        cookie = self.cookies[1] if self.version == "1.2" else self.cookies[0]
        for slot, label in to_write:
            self.medium.write(self._slot_offset(slot),
                              pack_label(label, slot, self.version, cookie))
        self.medium.sync()  # labels durable before the index that makes them live
        next_block = 1 - self.current
        self.medium.write(self.base + next_block * self.index_size,
                          pack_index(next_block, self.index_size, self.version,
                                     next_seq(self.index.seq), self.index.nslot, free))
        self.medium.sync()
        self._load()
